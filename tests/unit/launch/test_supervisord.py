"""The one supervisord config writer."""

from __future__ import annotations

import configparser
from pathlib import Path

from app.launch.supervisord import Program, config_text, nested_stop_wait_s


def parsed(text: str) -> configparser.ConfigParser:
    conf = configparser.ConfigParser(interpolation=None, comment_prefixes=(";",))
    conf.read_string(text)
    return conf


def test_programs_groups_environment_and_quoting(tmp_path: Path) -> None:
    text = config_text(
        [
            Program("nats", ["nats-server", "-js"], 30, priority=10),
            Program(
                "Echo_0", ["python", "100%"], 60, {"TANDEM_REPLICA": "0", "CUDA_VISIBLE_DEVICES": "0,1"}, group="Echo"
            ),
            Program("Echo_1", ["python", "100%"], 60, {"TANDEM_REPLICA": "1"}, group="Echo"),
            Program("tandem-graph", ["tandem", "serve"], 250, stop_as_group=False),
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
    assert all(conf[s]["directory"] == "/app" for s in conf.sections() if s.startswith("program:"))


def test_a_nested_supervisord_gets_the_time_its_programs_take_one_after_another() -> None:
    assert nested_stop_wait_s(4, 60) == 4 * 60 + 10
