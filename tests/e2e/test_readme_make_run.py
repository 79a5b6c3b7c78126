"""README.md's first steps, run as written: `make run` (NATS + etcd, then graphs.agg_router
on CPU with two vLLM workers on port 8000) in one terminal, the guide's streamed chat
request in another, then Ctrl-C, which the README says stops the graph and the NATS and
etcd it started.

The test adds TANDEM_STATE_DIR to the environment, so that the servers `make run` starts
are recorded in (and, whatever happens, stopped from) the test's directory, never the
repository's .state, which another `make run` on this machine may be using.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from tests.docs.blocks import REPO, doc_blocks
from tests.docs.shell import DocShell, sse_data, user_environment

pytestmark = pytest.mark.e2e

MAKE_RUN, CHAT_CURL = doc_blocks("readme-make-run", "readme-chat-curl")
# The Makefile's default CONFIG for `make run`.
FRONTEND_PORT = yaml.safe_load((REPO / "configs" / "cpu-tiny.yaml").read_text())["Frontend"]["port"]
# `tandem infra up`'s defaults (NATS, its monitoring, etcd clients and peers) and the Frontend's.
FIXED_PORTS = (4222, 8222, 2379, 2380, FRONTEND_PORT)
START_TIMEOUT_S = 600  # `make model`, NATS + etcd, two vLLM engines on two cores


def _ports_in_use() -> list[int]:
    in_use = []
    for port in FIXED_PORTS:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                in_use.append(port)
    return in_use


def test_make_run_serves_the_guides_request_until_ctrl_c(tmp_path: Path) -> None:
    if in_use := _ports_in_use():
        pytest.fail(f"`make run` binds fixed ports, and these are in use on this machine: {in_use}")
    (make_run,) = MAKE_RUN.expect("make run")
    (curl,) = CHAT_CURL.expect("curl")
    env = user_environment(TANDEM_STATE_DIR=str(tmp_path / "state"))
    with DocShell(tmp_path / "shell", env=env) as shell:
        try:
            terminal = shell.start(make_run)
            shell.wait_http(f"http://127.0.0.1:{FRONTEND_PORT}/health", START_TIMEOUT_S)

            events = list(sse_data(shell.run(curl)))
            assert events and events[-1] == "[DONE]", events[-3:]
            chunks = [json.loads(event) for event in events[:-1]]
            pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
            assert sum(1 for piece in pieces if piece) > 1, "expected the reply in several streamed chunks"
            assert "".join(pieces).strip()
            assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] in ("length", "stop")

            terminal.interrupt()
            assert _ports_in_use() == [], "Ctrl-C left servers of `make run` listening"
        finally:
            shell.stop_all()
            shell.check(".venv/bin/tandem infra down")
