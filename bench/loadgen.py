"""The load generator: generated prompts, sent by the load driver to an OpenAI-compatible server, and
the summary of the measured phase (docs/benchmarks.md, "Load generator", has the options)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from bench.harness import cli
from bench.harness.load import CHAT_PATH, COMPLETIONS_PATH, RequestResult, drive, prompts, request_body
from bench.harness.stats import Summary, summarize

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
    long_share: float = 0.0  # of the requests, whose prompt is long_prompt_tokens long and shares nothing
    long_prompt_tokens: int = 1024
    max_tokens: int = 64
    stream: bool = True
    api: Literal["chat", "completions"] = "chat"
    seed: int = 0
    ignore_eos: bool = False
    warmup: int = 0
    timeout_s: float = 120.0
    max_duration_s: float = 600.0

    def __post_init__(self) -> None:
        sizes = (self.concurrency, self.prompt_tokens, self.long_prompt_tokens, self.max_tokens, self.prefix_groups)
        ratios = (self.shared_prefix_ratio, self.long_share)
        if min(sizes) < 1 or min(self.requests, self.warmup) < 0 or not all(0.0 <= r <= 1.0 for r in ratios):
            raise ValueError(
                "concurrency, prompt_tokens, long_prompt_tokens, max_tokens and prefix_groups must be >= 1, "
                "requests and warmup >= 0, shared_prefix_ratio and long_share within [0, 1]"
            )

    def is_long(self, index: int) -> bool:
        """Whether request `index` has a long prompt: a draw of its own, so the same for a seed and index."""
        return self.long_share > 0 and random.Random(f"{self.seed}:long:{index}").random() < self.long_share

    def bodies(self, count: int, first_index: int = 0) -> list[dict[str, Any]]:
        texts = prompts(count, self.prompt_tokens, self.seed, self.shared_prefix_ratio, self.prefix_groups, first_index)
        if self.long_share:
            long = prompts(count, self.long_prompt_tokens, self.seed, first_index=first_index)
            texts = [long[i] if self.is_long(first_index + i) else text for i, text in enumerate(texts)]
        chat = self.api == "chat"
        return [request_body(self.model, t, self.max_tokens, chat, self.stream, self.ignore_eos) for t in texts]


async def run_load(config: LoadConfig) -> tuple[Summary, list[RequestResult]]:
    """Warm up (prompts of their own, on the same shared prefixes), then the measured phase:
    its summary and per-request results."""
    path = CHAT_PATH if config.api == "chat" else COMPLETIONS_PATH
    limits = (config.concurrency, config.max_duration_s, config.timeout_s)
    if config.warmup:
        warmup, _ = await drive(config.url, path, config.bodies(config.warmup, first_index=config.requests), *limits)
        log.info("warm-up: %d requests, %d failed", len(warmup), sum(not r.ok for r in warmup))
    results, duration = await drive(config.url, path, config.bodies(config.requests), *limits)
    summary = summarize(results, duration)
    for kind, example in summary.error_examples.items():  # a benchmark goes on through failures
        log.warning("%d requests failed: %s, e.g. %s", summary.errors[kind], kind, example)
    return summary, results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (http://)")
    parser.add_argument("--model", required=True, help="model name the server serves")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    parser.add_argument("--requests", type=int, default=100, help="measured requests")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in words (~tokens)")
    parser.add_argument("--shared-prefix-ratio", type=float, default=0.0, help="share of each prompt shared (0..1)")
    parser.add_argument("--prefix-groups", type=int, default=1, help="number of distinct shared prefixes")
    parser.add_argument("--long-share", type=float, default=0.0, help="share of requests with a long prompt")
    parser.add_argument("--long-prompt-tokens", type=int, default=1024, help="its length in words")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ignore-eos", action="store_true", help="every output exactly max_tokens long")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--api", choices=("chat", "completions"), default="chat")
    parser.add_argument("--seed", type=int, default=0, help="prompt generation seed")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    parser.add_argument("--timeout", dest="timeout_s", type=float, default=120.0, help="per-request limit, seconds")
    parser.add_argument("--max-duration", dest="max_duration_s", type=float, default=600.0, help="no start after (s)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    cli.setup_logging()
    try:
        config = LoadConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LoadConfig)})
    except ValueError as exc:
        parser.error(str(exc))
    summary, _ = cli.run(run_load(config))
    # msgspec writes a metric without samples (NaN) as null: strict JSON.
    text = msgspec.json.format(msgspec.json.encode(summary)).decode() if args.json else summary.as_text()
    sys.stdout.write(text + "\n")
    return 0 if summary.completed else 1


if __name__ == "__main__":
    sys.exit(main())
