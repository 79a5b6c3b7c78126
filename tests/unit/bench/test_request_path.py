"""bench/request_path.py: the report judges each layout and compares them side by side."""

from __future__ import annotations

from bench.request_path import PathResult, render


def test_the_report_judges_each_layout_and_compares_them_side_by_side() -> None:
    def result(layout: str, rps: float, frontend: float, router: float = 0.0) -> PathResult:
        cpu = {"Frontend": frontend, "Processor": 0.0, "VllmWorker": 0.5, "nats-server": 0.2}
        if router:
            cpu["Router"] = router
        return PathResult(concurrency=16, requests_per_s=rps, cpu_ms_per_request=cpu, layout=layout)

    embedded = [result("router-in-frontend", rps, 1.2) for rps in (700, 800, 900)]
    processes = [result("router-processes", rps, 1.3, 0.7) for rps in (400, 500, 600)]
    report = render([embedded, processes], "python -m bench.request_path", 3)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| router-")}
    assert (
        rows["router-in-frontend"]
        == "| router-in-frontend | 16 | 800 (target >= 600: yes) | 1.20 | none | 0.00 | 1.20 yes | 0.50 | 0.20 |"
    )
    assert "500 (target >= 600: **no**)" in rows["router-processes"] and "| 2.00 **no** |" in rows["router-processes"]
    assert "1.60x the requests/s, path CPU per request 1.67x lower" in report
