"""The load generator: generated prompts sent by the load driver (bench/harness/load.py) to an
OpenAI-compatible server, and a summary of the measured phase. docs/benchmarks.md, "Load generator",
gives the options and what each figure means.

    python -m bench.loadgen --url http://127.0.0.1:8000 --model tiny-llama --concurrency 8 --requests 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from bench.harness import cli
from bench.harness.load import CHAT_PATH, COMPLETIONS_PATH, RequestResult, drive, prompts, request_body
from bench.harness.stats import percentile

log = logging.getLogger(__name__)


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
    api: Literal["chat", "completions"] = "chat"
    seed: int = 0
    ignore_eos: bool = False
    warmup: int = 0
    timeout_s: float = 120.0
    max_duration_s: float = 600.0

    def __post_init__(self) -> None:
        if (
            min(self.concurrency, self.prompt_tokens, self.max_tokens, self.prefix_groups) < 1
            or min(self.requests, self.warmup) < 0
            or not 0.0 <= self.shared_prefix_ratio <= 1.0
        ):
            raise ValueError(
                "concurrency, prompt_tokens, max_tokens and prefix_groups must be >= 1, requests and "
                "warmup >= 0, shared_prefix_ratio within [0, 1]"
            )

    def bodies(self, count: int, first_index: int = 0) -> list[dict[str, Any]]:
        texts = prompts(count, self.prompt_tokens, self.seed, self.shared_prefix_ratio, self.prefix_groups, first_index)
        return [
            request_body(self.model, t, self.max_tokens, self.api == "chat", self.stream, self.ignore_eos)
            for t in texts
        ]


@dataclass
class Summary:
    requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # successful requests over the wall time of the measured phase
    output_token_throughput: float  # and their output tokens
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
            (
                f"throughput      {self.request_throughput:.2f} req/s, "
                f"{self.output_token_throughput:.1f} output tok/s ({self.total_output_tokens} tokens)"
            ),
            f"prompt tokens   {self.mean_prompt_tokens:.1f} mean (server usage)",
            f"TTFT            p50 {self.ttft_p50_s * ms:.1f} ms  p99 {self.ttft_p99_s * ms:.1f} ms",
            f"ITL             p50 {self.itl_p50_s * ms:.2f} ms  p99 {self.itl_p99_s * ms:.2f} ms",
            f"end-to-end      p50 {self.e2e_p50_s * ms:.1f} ms  p99 {self.e2e_p99_s * ms:.1f} ms",
        ]
        lines += [
            f"error           {kind}: {count} (e.g. {self.error_examples.get(kind, '')!r})"
            for kind, count in sorted(self.errors.items())
        ]
        lines += [f"worker          {worker}: {count}" for worker, count in sorted(self.workers.items())]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """For strict JSON: a metric with no samples (NaN) is None."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def summarize(results: Sequence[RequestResult], duration_s: float) -> Summary:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [gap for r in ok for gap in r.itl_s]
    e2es = [r.e2e_s for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    failed = [r for r in results if not r.ok]
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
        mean_prompt_tokens=(sum(r.prompt_tokens for r in ok) / len(ok)) if ok else math.nan,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        itl_p50_s=percentile(itls, 50),
        itl_p99_s=percentile(itls, 99),
        e2e_p50_s=percentile(e2es, 50),
        e2e_p99_s=percentile(e2es, 99),
        errors=dict(Counter(r.error_kind or "unknown" for r in failed)),
        error_examples=examples,
        workers=dict(Counter(r.worker for r in ok if r.worker is not None)),
    )


async def run_load(config: LoadConfig) -> tuple[Summary, list[RequestResult]]:
    """Warm up (prompts of their own, on the same shared prefixes), then the measured phase:
    its summary and per-request results."""
    path = CHAT_PATH if config.api == "chat" else COMPLETIONS_PATH
    limits = (config.concurrency, config.max_duration_s, config.timeout_s)
    if config.warmup:
        warmup, _ = await drive(config.url, path, config.bodies(config.warmup, first_index=config.requests), *limits)
        log.info("warm-up: %d requests, %d failed", len(warmup), sum(not r.ok for r in warmup))
    results, duration = await drive(config.url, path, config.bodies(config.requests), *limits)
    return summarize(results, duration), results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (http://)")
    parser.add_argument("--model", required=True, help="model name the server serves")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    parser.add_argument("--requests", type=int, default=100, help="measured requests to send")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="approximate prompt length")
    parser.add_argument("--shared-prefix-ratio", type=float, default=0.0, help="fraction of each prompt shared (0..1)")
    parser.add_argument("--prefix-groups", type=int, default=1, help="number of distinct shared prefixes")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--api", choices=("chat", "completions"), default="chat")
    parser.add_argument("--seed", type=int, default=0, help="prompt generation seed")
    parser.add_argument(
        "--ignore-eos", action="store_true", help="send ignore_eos so each output has max_tokens tokens"
    )
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    parser.add_argument("--timeout", dest="timeout_s", type=float, default=120.0, help="per-request limit, seconds")
    parser.add_argument(
        "--max-duration",
        dest="max_duration_s",
        type=float,
        default=600.0,
        help="no new request starts after this many seconds",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cli.setup_logging()
    try:
        config = LoadConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LoadConfig)})
    except ValueError as exc:
        _parser().error(str(exc))
    summary, _ = cli.run(run_load(config))
    sys.stdout.write((json.dumps(summary.as_dict(), indent=2) if args.json else summary.as_text()) + "\n")
    return 0 if summary.completed else 1


if __name__ == "__main__":
    sys.exit(main())
