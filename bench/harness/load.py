"""The one load driver: a load's generated requests (LoadConfig), streamed chat requests sent by closed-loop
clients that measure each (TTFT, the gaps between text chunks, end-to-end time, usage, X-Tandem-Worker); the
summary of the phase, and the medians over runs. A failure is a result, never an exception. Hand-written
asyncio HTTP, not aiohttp: on 2 cores each client millisecond is one the servers lack."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import socket
import statistics
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import msgspec

log = logging.getLogger(__name__)

WORKER_HEADER = "x-tandem-worker"
ERROR_MESSAGE_LIMIT = 200

# Short, common English words: byte-level BPE tokenizers (Llama 3, GPT-2 style) encode
# each one, with its leading space, as a single token, so N words make about N tokens.
WORDS = (  # noqa: SIM905 (one string reads as the list of words it is)
    "the of and to in is was for on that with as by at from his her they this are had not but have one all "
    "were when there can been who will more would some time into only other new could than first also after "
    "made many most over such way year day man work life back world still hand old great good long small "
    "place part case week house point home water room story fact month book eye job word side kind head city "
    "name team idea body face level law war line end game hour child car power light sound music river road "
    "field table window paper green black white red blue early late young high low open close round short "
    "strong quick slow bright dark warm cold north south east west tree stone bird fish horse rain snow wind "
    "fire earth gold iron glass bread milk salt sugar plan test rule list form note page sign track ship"
).split()


def prompts(
    count: int, words: int, seed: int = 0, shared_ratio: float = 0.0, groups: int = 1, first_index: int = 0
) -> list[str]:
    """`count` prompts of `words` words; the first `shared_ratio` of each is one of `groups` prefixes
    (request i uses group i mod groups), the rest is the request's own. Deterministic in seed and index."""
    prefix_len = round(words * shared_ratio)
    prefix_rng = random.Random(f"{seed}:prefix")
    prefixes = [prefix_rng.choices(WORDS, k=prefix_len) for _ in range(groups)]
    return [
        " ".join(prefixes[i % groups] + random.Random(f"{seed}:request:{i}").choices(WORDS, k=words - prefix_len))
        for i in range(first_index, first_index + count)
    ]


@dataclass(frozen=True)
class LoadConfig:
    """A closed-loop load: docs/benchmarks.md, "Load generator", says what each field does."""

    model: str
    url: str = "http://127.0.0.1:8000"
    concurrency: int = 1
    requests: int = 100
    prompt_tokens: int = 128
    shared_prefix_ratio: float = 0.0
    prefix_groups: int = 1
    long_share: float = 0.0  # of the requests, whose prompt is long_prompt_tokens long and shares nothing
    long_prompt_tokens: int = 1024
    max_tokens: int = 64
    seed: int = 0
    ignore_eos: bool = False
    warmup: int = 0
    timeout_s: float = 120.0
    max_duration_s: float = 600.0
    api_key: str | None = None  # sent as `Authorization: Bearer KEY` (a Frontend with API keys)
    extra_body: Mapping[str, Any] | None = None  # more fields of every request (tools, response_format, ...)

    def __post_init__(self) -> None:
        sizes = (self.concurrency, self.prompt_tokens, self.long_prompt_tokens, self.max_tokens, self.prefix_groups)
        ratios = (self.shared_prefix_ratio, self.long_share)
        if min(sizes) < 1 or min(self.requests, self.warmup) < 0 or not all(0.0 <= r <= 1.0 for r in ratios):
            raise ValueError(
                "concurrency, prompt_tokens, long_prompt_tokens, max_tokens and prefix_groups must be >= 1, "
                "requests and warmup >= 0, shared_prefix_ratio and long_share within [0, 1]"
            )

    def describe(self) -> str:
        """The load as a report states it: "160 streamed chat requests at concurrency 16, prompts of ..."."""
        prompts = f"prompts of ~{self.prompt_tokens} words"
        if self.shared_prefix_ratio:
            prompts += f" (the first {self.shared_prefix_ratio:.0%} one of {self.prefix_groups} shared prefixes)"
        if self.long_share:
            prompts += f", {self.long_share:.0%} of them ~{self.long_prompt_tokens} words"
        output = f"{self.max_tokens} output tokens{' (ignore_eos)' if self.ignore_eos else ''}"
        return f"{self.requests} streamed chat requests at concurrency {self.concurrency}, {prompts}, {output}"

    def is_long(self, index: int) -> bool:
        """Whether request `index` has a long prompt: a draw of its own, so the same for a seed and index."""
        return self.long_share > 0 and random.Random(f"{self.seed}:long:{index}").random() < self.long_share

    def endless_bodies(self, batch: int = 100) -> Iterator[dict[str, Any]]:
        """`bodies` without end, a batch at a time (a load that stops by time): 100 cost the loop ~4 ms."""
        for first_index in itertools.count(0, batch):
            yield from self.bodies(batch, first_index)

    def bodies(self, count: int, first_index: int = 0) -> list[dict[str, Any]]:
        """Streamed chat requests, each asking for the usage chunk, which counts the tokens."""
        texts = prompts(count, self.prompt_tokens, self.seed, self.shared_prefix_ratio, self.prefix_groups, first_index)
        if self.long_share:
            long = prompts(count, self.long_prompt_tokens, self.seed, first_index=first_index)
            texts = [long[i] if self.is_long(first_index + i) else text for i, text in enumerate(texts)]
        common: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "stream": True}
        common["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            common["ignore_eos"] = True  # vLLM's: every output is exactly max_tokens long
        common.update(self.extra_body or {})
        return [{**common, "messages": [{"role": "user", "content": text}]} for text in texts]


@dataclass
class RequestResult:
    ok: bool
    e2e_s: float  # sending to [DONE]
    sent_at: float = 0.0  # time.perf_counter() when sent
    ttft_s: float | None = None  # to the first chunk with text (OpenAI's role-only opening chunk has none)
    itl_s: list[float] = field(default_factory=list)  # the gaps between text chunks
    output_tokens: int = 0  # these three from the server's usage block
    prompt_tokens: int = 0
    cached_tokens: int = 0
    worker: str | None = None  # the X-Tandem-Worker header
    error_kind: str | None = None
    error_message: str | None = None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating between the closest ranks (numpy's default)."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Summary:
    """A load phase's figures over its successful requests (docs/benchmarks.md, "Load generator")."""

    requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # successful requests over the wall time of the phase
    output_token_throughput: float  # and their output tokens
    total_output_tokens: int
    mean_prompt_tokens: float  # the server's count
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    itl_p50_s: float
    itl_p99_s: float
    itl_p999_s: float  # a long prefill stalling a batch is a few gaps in a thousand: p99.9 sees it
    e2e_p50_s: float
    e2e_p99_s: float
    errors: dict[str, int]
    error_examples: dict[str, str]
    workers: dict[str, int]

    def as_text(self) -> str:
        """One line per figure, times in milliseconds."""
        lines = []
        for name, value in vars(self).items():
            if isinstance(value, float):
                value = f"{value * 1000:.2f} ms" if name.endswith("_s") else f"{value:.2f}"
            lines.append(f"{name.removesuffix('_s'):24} {value}")
        return "\n".join(lines)


def summarize(results: Sequence[RequestResult], duration_s: float) -> Summary:
    ok, failed = [r for r in results if r.ok], [r for r in results if not r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    # A request's decode pace, however its tokens were bunched into streamed chunks.
    tpots = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.ttft_s is not None and r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl_s]
    e2es = [r.e2e_s for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    examples: dict[str, str] = {}
    for r in failed:
        examples.setdefault(r.error_kind or "unknown", r.error_message or "")
    return Summary(
        requests=len(results),
        completed=len(ok),
        failed=len(failed),
        duration_s=duration_s,
        request_throughput=len(ok) / duration_s if duration_s > 0 else 0.0,
        output_token_throughput=tokens / duration_s if duration_s > 0 else 0.0,
        total_output_tokens=tokens,
        mean_prompt_tokens=statistics.fmean(r.prompt_tokens for r in ok) if ok else math.nan,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        tpot_p50_s=percentile(tpots, 50),
        itl_p50_s=percentile(itls, 50),
        itl_p99_s=percentile(itls, 99),
        itl_p999_s=percentile(itls, 99.9),
        e2e_p50_s=percentile(e2es, 50),
        e2e_p99_s=percentile(e2es, 99),
        errors=dict(Counter(r.error_kind or "unknown" for r in failed)),
        error_examples=examples,
        workers=dict(Counter(r.worker for r in ok if r.worker is not None)),
    )


def median(values: Iterable[float]) -> float:
    """The median of the values that are numbers (a run without samples gives NaN: it is left out)."""
    numbers = [v for v in values if not math.isnan(v)]
    return statistics.median(numbers) if numbers else math.nan


@dataclass
class Phase:
    """One load phase on one system, measured: a row of a benchmark's table in one run."""

    row: tuple[str, ...]  # the row's label cells, e.g. ("tandem", "32")
    summary: Summary
    extra: dict[str, float] = field(default_factory=dict)  # figures a benchmark adds to the Summary's

    def figure(self, name: str) -> float:
        return self.extra[name] if name in self.extra else float(getattr(self.summary, name))


def median_rows(phases: Iterable[Phase]) -> dict[tuple[str, ...], dict[str, float]]:
    """Per row (in the order of their first runs), each figure's median over its runs, but "failed": the
    sum of the runs' failed requests; "runs" counts them."""
    by_row: dict[tuple[str, ...], list[Phase]] = {}
    for phase in phases:
        by_row.setdefault(phase.row, []).append(phase)
    names = [f.name for f in fields(Summary) if f.type in ("int", "float")]
    rows = {}
    for row, runs in by_row.items():
        rows[row] = {name: median(r.figure(name) for r in runs) for name in [*names, *runs[0].extra]}
        rows[row].update(runs=len(runs), failed=sum(r.summary.failed for r in runs))
    return rows


class Connection:
    """One keep-alive HTTP/1.1 connection; `reusable` says whether the next request may use it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, api_key: str | None = None
    ) -> None:
        self._reader, self._writer, self._host = reader, writer, host
        self._auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.reusable = True

    @classmethod
    async def open(cls, host: str, port: int, api_key: str | None = None) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        # Without it a small write can wait ~40 ms for a delayed ACK and distort TTFT.
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, host, api_key)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str]]:
        """Sends a request; returns the response's status and headers (names in lower case)."""
        self.reusable = False  # until its whole body has been read
        self._writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Type: application/json\r\n{self._auth}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in lines[1:]) if name
        }
        return int(lines[0][9:12]), headers

    async def read_body(self, headers: dict[str, str], feed: Callable[[bytes], None]) -> None:
        """Feeds the body to `feed` as it arrives: chunk by chunk when chunked (a streamed response)."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await self._reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
                feed((await self._reader.readexactly(size + 2))[:-2])
            await self._reader.readexactly(2)  # the empty trailer: none of the servers measured sends one
        elif "content-length" in headers:
            feed(await self._reader.readexactly(int(headers["content-length"])))
        else:
            feed(await self._reader.read())  # the body ends with the connection
            return
        self.reusable = headers.get("connection", "").lower() != "close"

    def close(self) -> None:
        self._writer.close()


_decode = msgspec.json.Decoder().decode


class _Response:
    """One response as it arrives: the times of its text chunks, its usage, [DONE], an error event."""

    def __init__(self, streamed: bool) -> None:
        self.streamed = streamed
        self.body = b""  # the whole body (an error's); when streamed, only what is not yet a whole line
        self.text_at: list[float] = []
        self.usage: dict[str, Any] | None = None
        self.done_at: float | None = None
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        if not self.streamed:
            self.body += data
            return
        now = time.perf_counter()
        *lines, self.body = (self.body + data).split(b"\n")
        for line in lines:
            if not (line := line.strip()).startswith(b"data:"):
                continue
            if (payload := line[5:].strip()) == b"[DONE]":
                self.done_at = now
                continue
            chunk = _decode(payload)
            if (error := chunk.get("error")) is not None and self.error is None:
                self.error = str(error.get("message", error) if isinstance(error, dict) else error)
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                self.text_at.append(now)
            self.usage = chunk.get("usage") or self.usage


def _failure(started: float, kind: str, message: str, worker: str | None = None) -> RequestResult:
    return RequestResult(
        ok=False,
        e2e_s=time.perf_counter() - started,
        sent_at=started,
        worker=worker,
        error_kind=kind,
        error_message=message[:ERROR_MESSAGE_LIMIT],
    )


async def send(
    connection: Connection, path: str, body: bytes, started: float, reading: Counter[str] | None = None
) -> RequestResult:
    """One request on an open connection, measured from `started` (time.perf_counter()); `reading`, where
    given, counts the responses being read by the worker (X-Tandem-Worker) that serves them."""
    status, headers = await connection.request("POST", path, body)
    worker = headers.get(WORKER_HEADER)
    response = _Response(streamed=status == 200 and headers.get("content-type", "").startswith("text/event-stream"))
    if reading is not None and worker is not None:
        reading[worker] += 1
    try:
        await connection.read_body(headers, response.feed)
    finally:
        if reading is not None and worker is not None:
            reading[worker] -= 1
    if status != 200:
        return _failure(started, f"http_{status}", response.body.decode(errors="replace"), worker)
    if response.error is not None:
        return _failure(started, "stream_error", response.error, worker)
    if response.done_at is None:
        return _failure(started, "truncated_stream", "stream ended without [DONE]", worker)
    if (usage := response.usage) is None:
        return _failure(started, "missing_usage", "no usage chunk (stream_options.include_usage)", worker)
    times = response.text_at
    return RequestResult(
        ok=True,
        e2e_s=response.done_at - started,
        sent_at=started,
        ttft_s=times[0] - started if times else None,
        itl_s=[later - earlier for earlier, later in itertools.pairwise(times)],
        output_tokens=int(usage.get("completion_tokens") or 0),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        worker=worker,
    )


async def drive(
    config: LoadConfig, bodies: Iterable[dict[str, Any]], reading: Counter[str] | None = None
) -> tuple[list[RequestResult], float]:
    """Closed loop: `config.concurrency` clients take the bodies in order, each on a connection of its own;
    none starts a request after `max_duration_s`, and `timeout_s` bounds each. Returns the results in
    request order (those of the first requests: the ones never sent are the last) and the wall time.
    A sequence of bodies is encoded before the clock starts; an endless iterator (a soak's), as it goes.
    `reading`: the responses being read now, by worker (`send`)."""
    where, timeout_s = urllib.parse.urlsplit(config.url), config.timeout_s
    clients = config.concurrency
    if isinstance(bodies, Sequence):
        encoded: Iterable[bytes] = [msgspec.json.encode(body) for body in bodies]
        clients = min(clients, max(len(bodies), 1))
    else:
        encoded = map(msgspec.json.encode, bodies)
    results: dict[int, RequestResult] = {}
    pending = enumerate(encoded)
    deadline = time.monotonic() + config.max_duration_s

    async def client() -> None:
        connection: Connection | None = None
        for index, body in pending:
            if time.monotonic() >= deadline:
                break
            started = time.perf_counter()
            try:
                async with asyncio.timeout(timeout_s):
                    connection = connection or await Connection.open(
                        where.hostname or "127.0.0.1", where.port or 80, config.api_key
                    )
                    results[index] = await send(connection, "/v1/chat/completions", body, started, reading)
            except TimeoutError:
                results[index] = _failure(started, "timeout", f"no complete response within {timeout_s} s")
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                results[index] = _failure(started, type(exc).__name__, str(exc))
            except ValueError as exc:  # msgspec.DecodeError too
                results[index] = _failure(started, "bad_response", f"{type(exc).__name__}: {exc}")
            if connection is not None and not connection.reusable:
                connection.close()
                connection = None
        if connection is not None:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return [results[i] for i in sorted(results)], time.perf_counter() - started


async def run_load(config: LoadConfig) -> tuple[Summary, list[RequestResult]]:
    """Warm up (prompts of their own, on the same shared prefixes), then the measured phase:
    its summary and per-request results."""
    if config.warmup:
        warmup, _ = await drive(config, config.bodies(config.warmup, first_index=config.requests))
        log.info("warm-up: %d requests, %d failed", len(warmup), sum(not r.ok for r in warmup))
    results, duration = await drive(config, config.bodies(config.requests))
    summary = summarize(results, duration)
    for kind, example in summary.error_examples.items():  # a benchmark goes on through failures
        log.warning("%d requests failed: %s, e.g. %s", summary.errors[kind], kind, example)
    return summary, results
