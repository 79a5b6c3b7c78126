"""Tandem against NVIDIA Dynamo 1.6.1 on this machine (docs/benchmarks.md, "Against NVIDIA Dynamo"):
the shared side-by-side script (../shared/peers/dynamo/sidebyside.sh: Dynamo's mocker and KV router
in its frontend, Tandem's mocker graph in three layouts, one client, interleaved rounds) at each
concurrency asked, its JSON lines summarized into medians, ranges and ratios against Dynamo.

    python -m bench.vs_dynamo --concurrency 16 64 256 --rounds 3 --write-docs docs/benchmarks.md

Needs the Dynamo venv first: ../shared/peers/dynamo/install.sh (its README). The script runs
everything on 127.0.0.1 and stops each process by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.harness.cli import met, run_note, table, write_section
from testbed.graphs import REPO

SECTION = "## Against NVIDIA Dynamo 1.6.1 (mockers, side by side)"
SCRIPT = REPO.parent / "shared" / "peers" / "dynamo" / "sidebyside.sh"  # beside the project, read-only
DYNAMO = "dynamo-1.6.1"
# The script's labels, without the round, in the table's order; the default layout is the one judged.
SYSTEMS = {
    DYNAMO: "Dynamo 1.6.1 (KV router in its frontend)",
    "tandem-default": "Tandem, default config",
    "tandem-embed-router": "Tandem, `embed-router: true`",
    "tandem-router-processes": "Tandem, Router process (`embed-router: false`)",
}
JUDGED = "tandem-default"
# Issue 20's bound against Dynamo: requests/s at least this many times its own, per concurrency
# (1.2x past 16).
RPS_TARGET = {16: 1.3}
RPS_TARGET_PAST_16 = 1.2
# ...and the serving path's CPU per request (everything but the engines) at most this many times.
CPU_TARGET = 0.7
# Requests per round at each concurrency: enough for a few seconds of load at ~500 req/s.
REQUESTS = {16: 800, 64: 1200, 256: 2400}


@dataclass(frozen=True)
class Figures:
    """A system's medians over rounds at one concurrency, and each figure's range."""

    rounds: int
    rps: float
    rps_range: tuple[float, float]
    path_ms: float
    path_range: tuple[float, float]
    errors: int


def system_of(label: str) -> str:
    """ "tandem-default r2" -> "tandem-default"."""
    return label.rsplit(" ", 1)[0]


def summarize(rows: Iterable[Mapping]) -> dict[int, dict[str, Figures]]:
    """concurrency -> system -> its medians, from the script's JSON lines."""
    grouped: dict[int, dict[str, list[Mapping]]] = {}
    for row in rows:
        grouped.setdefault(row["concurrency"], {}).setdefault(system_of(row["label"]), []).append(row)
    summary: dict[int, dict[str, Figures]] = {}
    for concurrency, systems in grouped.items():
        summary[concurrency] = {}
        for system, runs in systems.items():
            rps = [r["rps"] for r in runs]
            path = [r["cpu_ms_per_req_path"] for r in runs]
            summary[concurrency][system] = Figures(
                rounds=len(runs),
                rps=statistics.median(rps),
                rps_range=(min(rps), max(rps)),
                path_ms=statistics.median(path),
                path_range=(min(path), max(path)),
                errors=sum(r["errors"] for r in runs),
            )
    return summary


def rps_target(concurrency: int) -> float:
    return RPS_TARGET.get(concurrency, RPS_TARGET_PAST_16)


def render(summary: Mapping[int, Mapping[str, Figures]]) -> list[str]:
    """The table: requests/s and serving-path CPU per request of every system against
    Dynamo's, the default config judged on both.

    The script sums the CPU of the sessions of the processes it started, less the engines':
    for Tandem `tandem serve` with its supervisord and programs (one session since the
    supervisord got a process group, not a session, of its own), NATS and etcd."""
    rows = []
    for concurrency in sorted(summary):
        systems = summary[concurrency]
        dynamo = systems.get(DYNAMO)
        for system, title in SYSTEMS.items():
            if system not in systems:
                continue
            f = systems[system]
            rps_ratio = cpu_ratio = ""
            if dynamo is not None and system != DYNAMO:
                r, c = f.rps / dynamo.rps, f.path_ms / dynamo.path_ms
                rps_ratio, cpu_ratio = f"{r:.2f}x", f"{c:.2f}x"
                if system == JUDGED:
                    target = rps_target(concurrency)
                    rps_ratio += f" (>= {target}: {met(r >= target)})"
                    cpu_ratio += f" (<= {CPU_TARGET}: {met(c <= CPU_TARGET)})"
            rows.append(
                [
                    str(concurrency),
                    title,
                    f"{f.rps:.0f} [{f.rps_range[0]:.0f}-{f.rps_range[1]:.0f}]",
                    rps_ratio,
                    f"{f.path_ms:.2f} [{f.path_range[0]:.2f}-{f.path_range[1]:.2f}]",
                    cpu_ratio,
                    str(f.errors),
                ]
            )
    header = "concurrency | system | requests/s [range] | vs Dynamo | path CPU-ms/req [range] | vs Dynamo | errors"
    return table(header, rows)


def run_script(script: Path, concurrency: int, rounds: int, requests: int, out: Path) -> None:
    env = {**os.environ, "C": str(concurrency), "N": str(requests), "ROUNDS": str(rounds)}
    subprocess.run(["bash", str(script), str(out)], cwd=REPO, env=env, check=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vs_dynamo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per concurrency (medians)")
    parser.add_argument("--from-jsonl", type=Path, nargs="*", help="summarize these script outputs, run nothing")
    parser.add_argument("--script", type=Path, default=SCRIPT, help="the side-by-side script (default: %(default)s)")
    parser.add_argument("--write-docs", type=Path, help="put the results in this markdown file's section")
    args = parser.parse_args(argv)
    started, load_before = time.time(), os.getloadavg()
    rows: list[Mapping] = []
    if args.from_jsonl:
        for path in args.from_jsonl:
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        if not args.script.exists():
            parser.error(f"{args.script} is not there (the shared Dynamo peer's script)")
        with tempfile.TemporaryDirectory(prefix="tandem-vs-dynamo-") as folder:
            for concurrency in args.concurrency:
                out = Path(folder) / f"c{concurrency}.jsonl"
                run_script(args.script, concurrency, args.rounds, REQUESTS.get(concurrency, 10 * concurrency), out)
                rows += [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    command = " ".join(["python -m bench.vs_dynamo", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    lines = [f"Command: `{command}`", ""]
    if not args.from_jsonl:
        lines += [run_note(started, load_before), ""]
    lines += render(summarize(rows))
    report = "\n".join(lines) + "\n"
    sys.stdout.write(report)
    if args.write_docs is not None:
        write_section(args.write_docs, f"{SECTION}\n\n{report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
