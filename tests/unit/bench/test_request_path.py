"""The request-path benchmark (bench/scenarios.py): the report judges each layout and compares them side by side."""

from __future__ import annotations

import argparse

from bench.harness.load import Phase, RequestResult, summarize
from bench.scenarios import REQUEST_KINDS, WITH_API_KEY, RequestPath


def test_the_report_judges_each_layout_and_compares_them_side_by_side() -> None:
    def phase(layout: str, rps: float, frontend: float, router: float = 0.0) -> Phase:
        summary = summarize([RequestResult(ok=True, e2e_s=0.01)] * int(rps), duration_s=1.0)
        cpu = {"Frontend": frontend, "Processor": 0.0, "VllmWorker": 0.5, "nats-server": 0.2, "path": frontend + router}
        return Phase((layout, "16"), summary, {**cpu, "Router": router} if router else cpu)

    embedded = [phase("router-in-frontend", rps, 1.2) for rps in (700, 800, 900)]
    processes = [phase("router-processes", rps, 1.3, 0.7) for rps in (400, 500, 600)]
    report = RequestPath().render([*embedded, *processes], argparse.Namespace(requests=None))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report if line.startswith("| router-")}
    assert (
        rows["router-in-frontend"]
        == "| router-in-frontend | 16 | 800 (target >= 600: yes) | 1.20 | none | 0.00 | 1.20 yes | 0.50 | 0.20 |"
    )
    assert "500 (target >= 600: **no**)" in rows["router-processes"] and "| 2.00 **no** |" in rows["router-processes"]
    assert (
        "- At concurrency 16, routing in the Frontend instead of in Router processes: 1.60x the requests/s, "
        "path CPU per request 1.67x lower." in report
    )


def test_the_report_gives_what_an_api_key_costs_beside_the_same_layout_without() -> None:
    def phase(layout: str, rps: float, frontend: float) -> Phase:
        summary = summarize([RequestResult(ok=True, e2e_s=0.01)] * int(rps), duration_s=1.0)
        cpu = {"Frontend": frontend, "Processor": 0.0, "VllmWorker": 0.5, "nats-server": 0.2, "path": frontend}
        return Phase((layout, "16"), summary, cpu)

    plain = [phase("router-in-frontend", 800, 1.20)]
    keyed = [phase(WITH_API_KEY, 780, 1.26)]
    report = RequestPath().render([*plain, *keyed], argparse.Namespace(requests=None))
    row = next(line for line in report if line.startswith(f"| {WITH_API_KEY} |"))
    assert row.split(" | ")[4] == "none"  # it routes in the Frontend: no Router processes
    assert (
        "- At concurrency 16, with an API key on every request: 0.97x the requests/s, 1.05x the path CPU per request."
        in report
    )


def test_the_report_puts_constrained_requests_beside_the_plain_ones_of_their_layout() -> None:
    def phase(row: str, rps: float, frontend: float, worker: float, tokens: int) -> Phase:
        summary = summarize([RequestResult(ok=True, e2e_s=0.01, output_tokens=tokens)] * int(rps), duration_s=1.0)
        cpu = {"Frontend": frontend, "Processor": 0.0, "VllmWorker": worker, "nats-server": 0.2, "path": frontend}
        return Phase((row, "16"), summary, cpu)

    kind = next(iter(REQUEST_KINDS))
    plain = phase("router-in-frontend", 800, 1.0, 0.5, 16)
    constrained = phase(f"router-in-frontend, {kind}", 600, 1.25, 1.0, 20)
    report = RequestPath().render([plain, constrained], argparse.Namespace(requests=None))
    rows = [line for line in report if line.startswith("| router-in-frontend")]
    # Beside the plain row; the issue's targets are the plain requests', so no verdict.
    assert rows == [
        "| router-in-frontend | 16 | 800 (target >= 600: yes) | 1.00 | none | 0.00 | 1.00 yes | 0.50 | 0.20 |",
        f"| router-in-frontend, {kind} | 16 | 600 | 1.25 | none | 0.00 | 1.25 | 1.00 | 0.20 |",
    ]
    assert (
        f"- At concurrency 16, `{kind}` against plain requests: 0.75x the requests/s, 1.25x the path CPU per "
        "request, 2.00x the mocker workers' (20.0 output tokens per request against 16)." in report
    )
