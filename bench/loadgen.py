"""The load generator: a closed-loop load on an OpenAI-compatible server, and the summary of the measured
phase (docs/benchmarks.md, "Load generator", has the options)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

import msgspec

from bench.harness import cli
from bench.harness.load import LoadConfig, run_load


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--url", default=LoadConfig.url, help="server base URL (http://)")
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
    parser.add_argument("--seed", type=int, default=0, help="prompt generation seed")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    parser.add_argument("--timeout", dest="timeout_s", type=float, default=120.0, help="per-request limit, seconds")
    parser.add_argument("--max-duration", dest="max_duration_s", type=float, default=600.0, help="no start after (s)")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer KEY (a Frontend with API keys)")
    parser.add_argument(
        "--extra-body", type=json.loads, help="more fields of every request, a JSON object: '{\"tool_choice\": ...}'"
    )
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
