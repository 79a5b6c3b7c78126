"""The `tandem` command line: every command the README names parses, and bad usage says so."""

from __future__ import annotations

import pytest

from app.cli import build_parser, main

README_COMMANDS = [
    ["serve", "graphs.agg_router:Frontend", "-f", "configs/cpu-tiny.yaml", "--dry-run"],
    ["serve", "components.prefill_worker:PrefillWorker", "-f", "configs/cpu-tiny-disagg.yaml"],
    ["serve", "components.worker:VllmWorker", "-f", "configs/multinode-405b.yaml", "--service-name", "VllmWorker"],
    ["config", "check", "-f", "configs/multinode-405b.yaml"],
    ["config", "env"],
    ["infra", "up", "--host", "10.0.0.1"],
    ["infra", "status"],
    ["infra", "down"],
    ["router", "show"],
    ["disagg", "set", "--max-local-prefill-length", "512", "--max-prefill-queue-size", "8"],
    ["ray", "head", "--port", "6379"],
    ["ray", "worker", "--address", "10.0.0.1:6379"],
    ["model", "make-tiny", "models/tiny-llama"],
    ["status"],
    ["status", "--json", "--watch", "5"],
]


@pytest.mark.parametrize("argv", README_COMMANDS, ids=lambda argv: " ".join(argv[:2]))
def test_every_command_the_docs_name_parses_to_a_handler(argv: list[str]) -> None:
    args = build_parser().parse_known_args(argv)[0]
    assert callable(args.func)


def test_no_command_prints_the_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code != 0
    assert "usage: tandem" in capsys.readouterr().err


def test_config_env_lists_the_seeds_variables(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "env"]) == 0
    listed = capsys.readouterr().out
    assert "NATS_SERVER" in listed and "ETCD_ENDPOINTS" in listed


def test_status_watch_takes_an_optional_interval() -> None:
    parser = build_parser()
    assert parser.parse_args(["status"]).watch is None
    assert parser.parse_args(["status", "--watch"]).watch == 2.0
    assert parser.parse_args(["status", "--watch", "0.5", "--namespace", "prod"]).watch == 0.5
