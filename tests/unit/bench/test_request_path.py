"""bench/request_path.py: how its lean client judges a streamed response."""

from __future__ import annotations

from bench.request_path import PathResult, completion_tokens, render


def _sse(*events: bytes) -> bytes:
    return b"".join(b"data: " + event + b"\n\n" for event in events)


def test_a_complete_stream_counts_the_usage_chunks_tokens() -> None:
    body = _sse(
        b'{"choices":[{"delta":{"role":"assistant","content":""}}]}',
        b'{"choices":[{"delta":{"content":"hello there"}}],"usage":null}',
        b'{"choices":[],"usage":{"prompt_tokens":40,"completion_tokens":16,"total_tokens":56}}',
        b"[DONE]",
    )
    assert completion_tokens(200, body) == 16


def test_failures_count_nothing() -> None:
    error = _sse(b'{"error":{"message":"boom","type":"internal_error"}}', b"[DONE]")
    cut_short = _sse(b'{"choices":[],"usage":{"completion_tokens":16}}')
    assert completion_tokens(200, error) == 0
    assert completion_tokens(200, cut_short) == 0
    assert completion_tokens(503, b'{"error":{"message":"no model"}}') == 0


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
    assert "800 (target >= 600: yes)" in rows["router-in-frontend"] and "| 1.20 yes |" in rows["router-in-frontend"]
    assert "500 (target >= 600: **no**)" in rows["router-processes"] and "| 2.00 **no** |" in rows["router-processes"]
    assert "1.60x the requests/s, path CPU per request 1.67x lower" in report
