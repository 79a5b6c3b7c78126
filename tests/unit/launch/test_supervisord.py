"""The one supervisord config writer."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from app.launch.supervisord import Program, config_text, nested_stop_wait_s


def parsed(text: str) -> configparser.ConfigParser:
    conf = configparser.ConfigParser(interpolation=None, comment_prefixes=(";",))
    conf.read_string(text)
    return conf


def test_programs_groups_environment_and_quoting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_CRASH_LOOP_EXITS", raising=False)
    monkeypatch.delenv("TANDEM_CRASH_LOOP_WINDOW_S", raising=False)
    text = config_text(
        [
            Program("nats", ["nats-server", "-js"], 30, priority=10),
            Program(
                "Echo_0", ["python", "100%"], 60, {"TANDEM_REPLICA": "0", "CUDA_VISIBLE_DEVICES": "0,1"}, group="Echo"
            ),
            Program("Echo_1", ["python", "100%"], 60, {"TANDEM_REPLICA": "1"}, group="Echo"),
            Program("tandem-graph", ["tandem", "serve"], 250, stop_as_group=False),
            Program("etcd-auth", ["tandem", "infra", "enable-auth"], 5, one_shot=True),
        ],
        tmp_path,
        Path("/app"),
        comments=["derived: X=1"],
    )
    assert text.startswith("; derived: X=1\n[supervisord]\n")
    conf = parsed(text)
    assert conf["unix_http_server"]["chmod"] == "0700"
    assert conf["program:nats"]["priority"] == "10" and conf["program:nats"]["stopwaitsecs"] == "30"
    assert "priority" not in conf["program:Echo_0"]
    # supervisord expands %(name)s: a literal % is doubled.
    assert conf["program:Echo_0"]["command"] == "python 100%%"
    assert conf["program:Echo_0"]["environment"] == 'TANDEM_REPLICA="0",CUDA_VISIBLE_DEVICES="0,1"'
    assert conf["group:Echo"]["programs"] == "Echo_0,Echo_1"
    assert conf["program:tandem-graph"]["stopasgroup"] == "false"
    assert conf["program:tandem-graph"]["killasgroup"] == "true"
    assert all(conf[s]["directory"] == "/app" for s in conf.sections() if s.startswith(("program:", "eventlistener:")))
    # supervisord never restarts a program itself: the listener does, after a backoff,
    # each program that is meant to keep running (the one-shot exits by design).
    assert {conf[s]["autorestart"] for s in conf.sections() if s.startswith("program:")} == {"false"}
    listener = conf["eventlistener:tandem-restarts"]
    restarted = "nats:nats Echo:Echo_0 Echo:Echo_1 tandem-graph:tandem-graph"
    # The crash-loop bounds as the environment gave them when the config was written.
    assert listener["command"].endswith(
        f"-m app.launch.restart_backoff --loop-exits 5 --loop-window-s 600 --run-dir {tmp_path} {restarted}"
    )
    assert listener["events"] == "PROCESS_STATE_RUNNING,PROCESS_STATE_EXITED,PROCESS_STATE_FATAL"
    assert listener["autorestart"] == "true"


def test_only_tandem_serve_stops_on_a_fatal_program(tmp_path: Path) -> None:
    programs = [Program("Echo_0", ["python"], 60, group="Echo")]
    serve = parsed(config_text(programs, tmp_path, Path("/app"), stop_on_fatal=True))
    container = parsed(config_text(programs, tmp_path, Path("/app")))
    assert "--stop-on-fatal" in serve["eventlistener:tandem-restarts"]["command"]
    assert "--stop-on-fatal" not in container["eventlistener:tandem-restarts"]["command"]


def test_a_nested_supervisord_gets_the_time_its_programs_take_one_after_another() -> None:
    assert nested_stop_wait_s(4, 60) == 4 * 60 + 10
