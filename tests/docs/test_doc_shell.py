"""The runner of documents' commands (tests/docs/shell.py), on commands that start nothing of Tandem's."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from tests.docs.blocks import Command
from tests.docs.shell import Background, DocShell, http_response, is_long_running, sse_data, user_environment


def _command(text: str) -> Command:
    return Command(text, 12, "README.md")


def test_exports_carry_to_the_next_command_and_plain_variables_do_not(tmp_path: Path) -> None:
    shell = DocShell(tmp_path, env=user_environment())
    shell.run(_command('export GREETING="hello there"; LOCAL=only-here'))
    assert shell.env["GREETING"] == "hello there"
    assert shell.run(_command('echo "$GREETING/${LOCAL:-unset}"')) == "hello there/unset\n"


def test_commands_run_in_the_shells_directory_with_placeholders_filled(tmp_path: Path) -> None:
    shell = DocShell(tmp_path / "logs", cwd=tmp_path, env=user_environment(), placeholders={"head-ip": "10.9.8.7"})
    assert shell.run(_command("pwd; echo <head-ip>:4222")) == f"{tmp_path}\n10.9.8.7:4222\n"


def test_a_failing_command_names_its_place_in_the_document(tmp_path: Path) -> None:
    shell = DocShell(tmp_path, env=user_environment())
    with pytest.raises(AssertionError, match=r"README\.md:12: echo oops >&2; exit 3\nexited 3:\n\noops"):
        shell.run(_command("echo oops >&2; exit 3"))


def test_the_environment_of_a_fresh_terminal_has_none_of_tandems_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_SERVER", "nats://10.0.0.1:4222")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    env = user_environment(TANDEM_STATE_DIR="/tmp/state")
    assert "NATS_SERVER" not in env and "VLLM_CPU_KVCACHE_SPACE" not in env
    assert env["TANDEM_STATE_DIR"] == "/tmp/state" and env["PATH"]


def test_what_stays_in_the_foreground_is_started_in_the_background() -> None:
    assert is_long_running(_command(".venv/bin/tandem serve graphs.agg:Frontend -f configs/cpu-tiny.yaml"))
    assert is_long_running(_command("make run"))
    assert not is_long_running(_command("tandem serve graphs.agg:Frontend -f configs/cpu-tiny.yaml --dry-run"))
    assert not is_long_running(_command(".venv/bin/tandem infra up"))


def _wait_until_ready(started: Background) -> None:
    """Until the command printed `ready`: it has set up what comes before."""
    deadline = time.monotonic() + 10
    while "ready" not in started.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_started_command_is_stopped_with_its_children(tmp_path: Path) -> None:
    with DocShell(tmp_path, env=user_environment()) as shell:
        started = shell.start(_command("sleep 600 & echo ready; sleep 600; wait"))
        _wait_until_ready(started)
        children = psutil.Process(started.pid).children(recursive=True)
        assert children and started.poll() is None
        shell.assert_running()
    assert started.poll() is not None
    deadline = time.monotonic() + 10  # SIGKILL lands asynchronously
    while any(_running(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(child) for child in children)


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_interrupt_is_ctrl_c_to_the_commands_process_group(tmp_path: Path) -> None:
    with DocShell(tmp_path, env=user_environment()) as shell:
        # Its foreground `sleep` gets the SIGINT too, as in a terminal; then bash runs the trap.
        started = shell.start(_command("trap 'exit 7' INT; echo ready; while :; do sleep 0.1; done"))
        _wait_until_ready(started)
        assert started.interrupt() == 7


def test_curls_printed_response_past_an_interim_100_continue() -> None:
    printed = (
        "HTTP/1.1 100 Continue\r\n\r\n"
        "HTTP/1.1 200 OK\r\nX-Tandem-Prefill-Worker: 6a6c\r\ncontent-type: text/event-stream\r\n\r\n"
        'data: {"a": 1}\r\n\r\ndata: [DONE]\r\n\r\n'
    ).replace("\r\n", "\n")  # as text mode reads it
    response = http_response(printed)
    assert (response.status, response.headers["x-tandem-prefill-worker"]) == (200, "6a6c")
    assert list(sse_data(response.body)) == ['{"a": 1}', "[DONE]"]
