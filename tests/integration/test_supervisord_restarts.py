"""A program that keeps dying after `startsecs`, under a real supervisord with the config
app.launch writes: each restart comes later than the last, and the healthcheck says so;
under `tandem serve`'s supervisord (--stop-on-fatal) its exits in a row end supervisord."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from app.launch.restart_backoff import read_fatal
from app.launch.supervisord import Program, config_text, supervisord_binary

REPO = Path(__file__).resolve().parents[2]
# Up past startsecs (1 s), then down: an engine that dies of CUDA OOM while it loads.
CRASH = ["sh", "-c", "sleep 1.3; exit 3"]
RESTARTS = 3
_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ "


def _times(pattern: str, log: str) -> list[float]:
    return [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f").timestamp() for m in re.findall(_STAMP + pattern, log)]


def _healthcheck(run_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TANDEM_RUN_DIR": str(run_dir),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    return subprocess.run(
        [str(REPO / "entrypoints" / "healthcheck.sh")], env=env, capture_output=True, text=True, timeout=30
    )


def _start_supervisord(tmp_path: Path, stop_on_fatal: bool) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """supervisord running CRASH as `crash`: it, its run folder, its log."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    conf = run_dir / "supervisord.conf"
    conf.write_text(config_text([Program("crash", CRASH, 5)], run_dir, REPO, stop_on_fatal=stop_on_fatal))
    log_path = tmp_path / "supervisord.log"
    with log_path.open("ab") as log_file:  # O_APPEND: supervisord opens /dev/stdout again for the programs
        proc = subprocess.Popen([supervisord_binary(), "-n", "-c", str(conf)], stdout=log_file, stderr=log_file)
    return proc, run_dir, log_path


def test_a_program_that_keeps_dying_is_restarted_later_each_time_and_the_node_is_unhealthy(tmp_path: Path) -> None:
    proc, run_dir, log_path = _start_supervisord(tmp_path, stop_on_fatal=False)
    try:
        deadline = time.monotonic() + 60
        while len(_times(r"spawned: 'crash'", log_path.read_text())) < RESTARTS + 1:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        health = _healthcheck(run_dir)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = log_path.read_text()
    exits = _times(r"exited: crash \(exit status 3; not expected\)", log)
    starts = _times(r"spawned: 'crash'", log)[1:]
    waits = [start - exit_ for exit_, start in zip(exits, starts, strict=False)][:RESTARTS]
    said = [int(d) for d in re.findall(r"crash ended by itself after \d s \(.*?\); starting it again in (\d+) s", log)]
    assert said[:RESTARTS] == [1, 2, 4], log
    # Each start waited for its delay; supervisord hands the listener an event up to a
    # second late.
    assert all(d - 0.1 <= w <= d + 1.5 for d, w in zip(said, waits, strict=False)), (waits, log)
    assert "(3 exits in a row, each within 600 s of its start)" in log, log
    assert "FATAL" not in log, log  # 5 exits in a row, by default, before a crash loop counts as FATAL
    assert health.returncode != 0, health.stdout + health.stderr
    assert "unhealthy: crash is restarting in a loop" in health.stdout, health.stdout + health.stderr


def test_exits_in_a_row_past_startsecs_count_as_fatal_and_end_serves_supervisord(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """supervisord itself never calls `crash` FATAL: each run outlasts startsecs. Its third
    exit in a row, each within 30 s of its start, does; with --stop-on-fatal (`tandem serve`'s
    supervisord) supervisord then shuts down, and says why where `tandem serve` and the
    healthcheck read it."""
    monkeypatch.setenv("TANDEM_CRASH_LOOP_EXITS", "3")
    monkeypatch.setenv("TANDEM_CRASH_LOOP_WINDOW_S", "30")
    proc, run_dir, log_path = _start_supervisord(tmp_path, stop_on_fatal=True)
    try:
        # Three runs of 1.3 s, 1 s and 2 s apart: about 7 s, then the shutdown.
        status = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(timeout=30)
        raise AssertionError(f"supervisord still runs after 60 s\n{log_path.read_text()}") from None
    log = log_path.read_text()
    assert status == 0, log  # a shutdown asked for; `tandem serve` turns the FATAL into its own exit 1
    assert len(re.findall(r"spawned: 'crash'", log)) == 3, log
    why = "3 exits in a row, each within 30 s of its start"
    assert f"crash is FATAL ({why}); stopping every program so that tandem serve exits" in log, log
    assert read_fatal(run_dir) == {"crash": why}
    health = _healthcheck(run_dir)
    assert health.returncode != 0, health.stdout + health.stderr
    assert f"unhealthy: crash went FATAL: {why}" in health.stdout, health.stdout + health.stderr
