"""bench.vs_dynamo's summary of the side-by-side script's JSON lines: medians by system and
concurrency, ratios against Dynamo and issue 20's verdicts (requests/s, path CPU) on the default config."""

from __future__ import annotations

from bench.vs_dynamo import render, summarize


def row(label: str, concurrency: int, rps: float, path: float, errors: int = 0) -> dict:
    return {
        "label": label,
        "concurrency": concurrency,
        "rps": rps,
        "cpu_ms_per_req_path": path,
        "cpu_ms_per_req_all": path + 1.0,
        "errors": errors,
    }


ROWS = [
    row("dynamo-1.6.1 r1", 16, 400, 2.0),
    row("dynamo-1.6.1 r2", 16, 500, 1.8),
    row("dynamo-1.6.1 r3", 16, 450, 1.9),
    row("tandem-default r1", 16, 600, 1.2),
    row("tandem-default r2", 16, 650, 1.3, errors=1),
    row("tandem-default r3", 16, 550, 1.1),
    row("dynamo-1.6.1 r1", 64, 600, 1.7),
    row("tandem-default r1", 64, 650, 1.4),
]


def test_medians_ranges_and_errors_are_per_system_and_concurrency() -> None:
    summary = summarize(ROWS)
    assert set(summary) == {16, 64}
    tandem = summary[16]["tandem-default"]
    assert (tandem.rounds, tandem.rps, tandem.rps_range, tandem.path_ms, tandem.errors) == (3, 600, (550, 650), 1.2, 1)
    assert summary[16]["dynamo-1.6.1"].rps == 450
    assert summary[64]["tandem-default"].rounds == 1


def test_the_default_config_is_judged_against_dynamo_at_each_concurrency() -> None:
    text = "\n".join(render(summarize(ROWS)))
    # 600 / 450 = 1.33x >= 1.3 at 16; 650 / 600 = 1.08x < 1.2 at 64.
    assert "1.33x (>= 1.3: yes)" in text
    assert "1.08x (>= 1.2: **no**)" in text
    # Path CPU: 1.2 / 1.9 = 0.63x <= 0.7 at 16; 1.4 / 1.7 = 0.82x > 0.7 at 64.
    assert "| 1.90 [1.80-2.00] |" in text and "| 1.20 [1.10-1.30] | 0.63x (<= 0.7: yes) |" in text
    assert "0.82x (<= 0.7: **no**)" in text
