"""Closed-loop load generator for an OpenAI-compatible server (Tandem's Frontend, vLLM, ...).

`--concurrency` clients each send one request after another until `--requests` have been
sent or `--max-duration` has passed, so a run always ends by itself. Per request it
records time to first token, the gaps between streamed content chunks, end-to-end
latency, output tokens (from the server's usage block) and the `X-Tandem-Worker` header,
then prints throughput, latency percentiles, errors by kind and the worker distribution.

    python -m bench.loadgen --url http://127.0.0.1:8000 --model tiny-llama \
        --concurrency 8 --requests 200 --prompt-tokens 512 --shared-prefix-ratio 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

WORKER_HEADER = "X-Tandem-Worker"
ERROR_MESSAGE_LIMIT = 200

# Short, common English words: byte-level BPE tokenizers (Llama 3, GPT-2 style) encode
# each one, with its leading space, as a single token, so N words make about N tokens.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this are had "
    "not but have one all were when there can been who will more would some time into "
    "only other new could than first also after made many most over such way year day "
    "man work life back world still hand old great good long small place part case week "
    "house point home water room story fact month book eye job word side kind head city "
    "name team idea body face level law war line end game hour child car power "
    "light sound music river road field table window paper green black white red blue "
    "early late young high low open close round short strong quick slow bright dark warm "
    "cold north south east west tree stone bird fish horse rain snow wind fire earth gold "
    "iron glass bread milk salt sugar plan test rule list form note page sign track ship"
).split()

Api = Literal["chat", "completions"]


@dataclass(frozen=True)
class LoadConfig:
    url: str
    model: str
    concurrency: int = 1
    requests: int = 100
    prompt_tokens: int = 128
    shared_prefix_ratio: float = 0.0
    prefix_groups: int = 1
    max_tokens: int = 64
    stream: bool = True
    api: Api = "chat"
    seed: int = 0
    ignore_eos: bool = False
    warmup: int = 0
    timeout_s: float = 120.0
    max_duration_s: float = 600.0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.requests < 0 or self.warmup < 0:
            raise ValueError("concurrency must be >= 1, requests and warmup >= 0")
        if self.prompt_tokens < 1 or self.max_tokens < 1:
            raise ValueError("prompt_tokens and max_tokens must be >= 1")
        if not 0.0 <= self.shared_prefix_ratio <= 1.0:
            raise ValueError("shared_prefix_ratio must be within [0, 1]")
        if self.prefix_groups < 1:
            raise ValueError("prefix_groups must be >= 1")
        if self.api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {self.api!r}")


@dataclass
class RequestResult:
    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    worker: str | None = None
    error_kind: str | None = None
    error_message: str | None = None


@dataclass
class Summary:
    requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    total_output_tokens: int
    mean_prompt_tokens: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    errors: dict[str, int]
    error_examples: dict[str, str]
    workers: dict[str, int]

    def as_text(self) -> str:
        ms = 1000.0
        lines = [
            f"requests        {self.completed} ok / {self.failed} failed in {self.duration_s:.2f} s",
            f"throughput      {self.request_throughput:.2f} req/s, "
            f"{self.output_token_throughput:.1f} output tok/s ({self.total_output_tokens} tokens)",
            f"prompt tokens   {self.mean_prompt_tokens:.1f} mean (server usage)",
            f"TTFT            p50 {self.ttft_p50_s * ms:.1f} ms  p99 {self.ttft_p99_s * ms:.1f} ms",
            f"ITL             p50 {self.itl_p50_s * ms:.2f} ms  p99 {self.itl_p99_s * ms:.2f} ms",
            f"end-to-end      p50 {self.e2e_p50_s * ms:.1f} ms  p99 {self.e2e_p99_s * ms:.1f} ms",
        ]
        for kind, count in sorted(self.errors.items()):
            lines.append(f"error           {kind}: {count} (e.g. {self.error_examples.get(kind, '')!r})")
        for worker, count in sorted(self.workers.items()):
            lines.append(f"worker          {worker}: {count}")
        return "\n".join(lines)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default method); NaN for no values, so an empty metric is visibly absent."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(results: Sequence[RequestResult], duration_s: float) -> Summary:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [gap for r in ok for gap in r.itl_s]
    e2es = [r.e2e_s for r in ok]
    total_tokens = sum(r.output_tokens for r in ok)
    failed = [r for r in results if not r.ok]
    errors = Counter(r.error_kind or "unknown" for r in failed)
    error_examples: dict[str, str] = {}
    for r in failed:
        error_examples.setdefault(r.error_kind or "unknown", r.error_message or "")
    workers = Counter(r.worker for r in ok if r.worker is not None)

    def per_second(count: int) -> float:
        return count / duration_s if duration_s > 0 else 0.0

    return Summary(
        requests=len(results),
        completed=len(ok),
        failed=len(failed),
        duration_s=duration_s,
        request_throughput=per_second(len(ok)),
        output_token_throughput=per_second(total_tokens),
        total_output_tokens=total_tokens,
        mean_prompt_tokens=(sum(r.prompt_tokens for r in ok) / len(ok)) if ok else math.nan,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        itl_p50_s=percentile(itls, 50),
        itl_p99_s=percentile(itls, 99),
        e2e_p50_s=percentile(e2es, 50),
        e2e_p99_s=percentile(e2es, 99),
        errors=dict(errors),
        error_examples=error_examples,
        workers=dict(workers),
    )


def summary_json(summary: Summary) -> str:
    """Strict JSON: a metric with no samples (NaN) becomes null."""
    fields = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(summary).items()}
    return json.dumps(fields, indent=2)


def build_prompts(config: LoadConfig, count: int, first_index: int = 0) -> list[str]:
    """`count` prompts of about `prompt_tokens` words each; the first
    `shared_prefix_ratio` of each is one of `prefix_groups` prefixes (request i uses
    group i mod prefix_groups), the rest is unique to the request. Deterministic in seed."""
    prefix_len = round(config.prompt_tokens * config.shared_prefix_ratio)
    suffix_len = config.prompt_tokens - prefix_len
    prefix_rng = random.Random(f"{config.seed}:prefix")
    prefixes = [prefix_rng.choices(WORDS, k=prefix_len) for _ in range(config.prefix_groups)]
    prompts = []
    for index in range(first_index, first_index + count):
        suffix_rng = random.Random(f"{config.seed}:request:{index}")
        words = prefixes[index % config.prefix_groups] + suffix_rng.choices(WORDS, k=suffix_len)
        prompts.append(" ".join(words))
    return prompts


def _nodelay_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """Socket factory for aiohttp's connector: TCP_NODELAY from the first byte, so a
    small request is never held back by Nagle waiting for a delayed ACK (~40 ms)."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _endpoint(config: LoadConfig) -> str:
    base = config.url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return f"{base}/v1/chat/completions" if config.api == "chat" else f"{base}/v1/completions"


def _request_body(config: LoadConfig, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": config.model, "max_tokens": config.max_tokens, "stream": config.stream}
    if config.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if config.stream:
        body["stream_options"] = {"include_usage": True}
    if config.ignore_eos:
        body["ignore_eos"] = True
    return body


def _chunk_text(chunk: dict[str, Any], api: Api) -> str:
    text = ""
    for choice in chunk.get("choices") or ():
        if api == "chat":
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


def _failure(started: float, kind: str, message: str, worker: str | None = None) -> RequestResult:
    return RequestResult(
        ok=False,
        e2e_s=time.perf_counter() - started,
        worker=worker,
        error_kind=kind,
        error_message=message[:ERROR_MESSAGE_LIMIT],
    )


async def _read_stream(
    response: aiohttp.ClientResponse, config: LoadConfig, started: float, worker: str | None
) -> RequestResult:
    content_times: list[float] = []
    usage: dict[str, Any] | None = None
    done = False
    async for raw_line in response.content:
        line = raw_line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[len(b"data:") :].strip()
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            return _failure(started, "stream_error", message, worker)
        if _chunk_text(chunk, config.api):
            content_times.append(time.perf_counter())
        if chunk.get("usage"):
            usage = chunk["usage"]
    finished = time.perf_counter()
    if not done:
        return _failure(started, "truncated_stream", "stream ended without [DONE]", worker)
    if usage is None:
        return _failure(started, "missing_usage", "no usage chunk (stream_options.include_usage)", worker)
    return RequestResult(
        ok=True,
        e2e_s=finished - started,
        ttft_s=(content_times[0] - started) if content_times else None,
        itl_s=[later - earlier for earlier, later in zip(content_times, content_times[1:])],
        output_tokens=int(usage.get("completion_tokens") or 0),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        worker=worker,
    )


async def send_request(session: aiohttp.ClientSession, config: LoadConfig, prompt: str) -> RequestResult:
    """One request, measured; every failure becomes a RequestResult, never an exception."""
    started = time.perf_counter()
    try:
        async with session.post(
            _endpoint(config),
            json=_request_body(config, prompt),
            timeout=aiohttp.ClientTimeout(total=config.timeout_s),
        ) as response:
            worker = response.headers.get(WORKER_HEADER)
            if response.status != 200:
                body = await response.text()
                return _failure(started, f"http_{response.status}", body, worker)
            if config.stream:
                return await _read_stream(response, config, started, worker)
            payload = await response.json()
            usage = payload.get("usage") or {}
            return RequestResult(
                ok=True,
                e2e_s=time.perf_counter() - started,
                output_tokens=int(usage.get("completion_tokens") or 0),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                worker=worker,
            )
    except asyncio.TimeoutError:
        return _failure(started, "timeout", f"no complete response within {config.timeout_s} s")
    except aiohttp.ClientError as exc:
        return _failure(started, type(exc).__name__, str(exc))
    except (ValueError, KeyError, TypeError, AttributeError, HttpProcessingError) as exc:
        return _failure(started, "bad_response", f"{type(exc).__name__}: {exc}")


async def _drive(
    session: aiohttp.ClientSession, config: LoadConfig, prompts: list[str], deadline: float
) -> list[RequestResult]:
    """`concurrency` clients sharing one queue of prompts; none starts a request after
    the deadline, and in-flight ones are bounded by the per-request timeout."""
    results: list[RequestResult] = []
    pending = iter(prompts)

    async def client() -> None:
        for prompt in pending:
            if time.monotonic() >= deadline:
                return
            results.append(await send_request(session, config, prompt))

    await asyncio.gather(*(client() for _ in range(min(config.concurrency, max(len(prompts), 1)))))
    return results


async def run_load(config: LoadConfig) -> tuple[Summary, list[RequestResult]]:
    """Warm up, then run the measured phase; returns its summary and per-request results."""
    connector = aiohttp.TCPConnector(limit=config.concurrency, socket_factory=_nodelay_socket)
    async with aiohttp.ClientSession(connector=connector) as session:
        if config.warmup:
            warmup_prompts = build_prompts(config, config.warmup, first_index=config.requests)
            warmup_results = await _drive(
                session, config, warmup_prompts, time.monotonic() + config.max_duration_s
            )
            failed = sum(not r.ok for r in warmup_results)
            log.info("warm-up: %d requests, %d failed", len(warmup_results), failed)
        prompts = build_prompts(config, config.requests)
        started = time.perf_counter()
        results = await _drive(session, config, prompts, time.monotonic() + config.max_duration_s)
        duration = time.perf_counter() - started
    return summarize(results, duration), results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--model", required=True, help="model name the server serves")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    parser.add_argument("--requests", type=int, default=100, help="measured requests to send")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="approximate prompt length")
    parser.add_argument(
        "--shared-prefix-ratio", type=float, default=0.0, help="fraction of each prompt shared (0..1)"
    )
    parser.add_argument("--prefix-groups", type=int, default=1, help="number of distinct shared prefixes")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--api", choices=("chat", "completions"), default="chat")
    parser.add_argument("--seed", type=int, default=0, help="prompt generation seed")
    parser.add_argument(
        "--ignore-eos", action="store_true", help="send ignore_eos so each output has max_tokens tokens"
    )
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request limit, seconds")
    parser.add_argument(
        "--max-duration", type=float, default=600.0, help="no new request starts after this many seconds"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = LoadConfig(
            url=args.url,
            model=args.model,
            concurrency=args.concurrency,
            requests=args.requests,
            prompt_tokens=args.prompt_tokens,
            shared_prefix_ratio=args.shared_prefix_ratio,
            prefix_groups=args.prefix_groups,
            max_tokens=args.max_tokens,
            stream=args.stream,
            api=args.api,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
            warmup=args.warmup,
            timeout_s=args.timeout,
            max_duration_s=args.max_duration,
        )
    except ValueError as exc:
        _parser().error(str(exc))
    summary, _ = asyncio.run(run_load(config))
    if args.json:
        sys.stdout.write(summary_json(summary) + "\n")
    else:
        sys.stdout.write(summary.as_text() + "\n")
    return 0 if summary.completed else 1


if __name__ == "__main__":
    sys.exit(main())
