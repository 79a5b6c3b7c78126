"""`tandem serve --dry-run` and `tandem config check` through the real console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.sdk.config import load_config
from app.sdk.graph import resolve
from app.sdk.supervisor import programs, supervisord_conf

REPO = Path(__file__).resolve().parents[3]
TANDEM = str(Path(sys.executable).parent / "tandem")
CONFIG = "configs/multinode-405b.yaml"


def tandem(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TANDEM, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def dry_run(*args: str) -> dict[str, tuple[int, list[str]]]:
    """Service name -> (process count, command line) from the dry-run's lines."""
    done = tandem("serve", *args, "-f", CONFIG, "--dry-run")
    assert done.returncode == 0, done.stderr
    out = {}
    for line in done.stdout.splitlines():
        name, count, *command = line.split()
        out[name] = (int(count.removeprefix("x")), command)
    return out


@pytest.mark.parametrize(
    ("args", "services"),
    [
        (["graphs.agg_router:Frontend"], ["Frontend", "Processor", "Router", "VllmWorker"]),
        (["graphs.disagg_router:Frontend"], ["Frontend", "Processor", "Router", "VllmWorker", "PrefillWorker"]),
        (["components.prefill_worker:PrefillWorker"], ["PrefillWorker"]),
        (["components.worker:VllmWorker", "--service-name", "VllmWorker"], ["VllmWorker"]),
    ],
)
def test_dry_run_lists_the_services_of_the_users_guide(args: list[str], services: list[str]) -> None:
    listed = dry_run(*args)
    assert list(listed) == services
    for name, (count, command) in listed.items():
        assert count == 1
        assert command[1:3] == ["-m", "app.sdk.process"]
        assert command[3].endswith(f":{name}")
        assert command[4:] == ["-f", str(REPO / CONFIG)]


def test_dry_run_passes_overrides_to_every_process_and_honours_workers() -> None:
    listed = dry_run("components.worker:VllmWorker", "--VllmWorker.ServiceArgs.workers=2", "--VllmWorker.router=kv")
    count, command = listed["VllmWorker"]
    assert count == 2
    assert command[-2:] == ["--VllmWorker.ServiceArgs.workers=2", "--VllmWorker.router=kv"]


def test_a_frontend_that_embeds_the_router_replaces_the_router_processes() -> None:
    embedded = "--Frontend.embed-router=true"
    assert list(dry_run("graphs.disagg_router:Frontend", embedded)) == [
        "Frontend", "Processor", "VllmWorker", "PrefillWorker"]
    # The Router alone still runs when asked for: Frontends without embed-router call it.
    assert list(dry_run("graphs.agg_router:Frontend", "--service-name", "Router", embedded)) == ["Router"]


def test_embed_router_without_the_embedded_processor_is_refused() -> None:
    done = tandem("serve", "graphs.agg_router:Frontend", "-f", CONFIG, "--dry-run",
                  "--Frontend.embed-router=true", "--Frontend.embed-processor=false")
    assert done.returncode == 1
    assert "embed-router needs embed-processor" in done.stderr
    assert done.stdout == ""


def test_serve_refuses_a_bad_config_before_starting_anything() -> None:
    done = tandem("serve", "graphs.agg:Frontend", "-f", CONFIG, "--dry-run", "--Frontend.prot=1")
    assert done.returncode == 1
    assert "Frontend: unknown key 'prot'" in done.stderr
    assert done.stdout == ""


def test_config_check_exit_status_and_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("Frontend:\n  served-model-name: m\n  prot: 8000\nFrontned: {}\n")
    done = tandem("config", "check", "-f", str(bad))
    assert done.returncode == 1
    assert "Frontend: unknown key 'prot'" in done.stderr
    assert "unknown service 'Frontned'" in done.stderr
    good = tmp_path / "good.yaml"
    good.write_text("Frontend:\n  served-model-name: m\n")
    done = tandem("config", "check", "-f", str(good))
    assert (done.returncode, done.stdout.strip()) == (0, f"OK: {good}")


def test_supervisord_program_runs_each_replica_with_its_index(tmp_path: Path) -> None:
    _, spec = resolve("components.worker:VllmWorker")
    config = load_config(None, ["--VllmWorker.ServiceArgs.workers=2", "--VllmWorker.served-model-name=100%"])
    conf = supervisord_conf(programs([spec], config, ["--VllmWorker.served-model-name=100%"]), tmp_path, REPO)
    section = conf[conf.index("[program:VllmWorker]"):]
    for line in ("numprocs=2", 'environment=TANDEM_REPLICA="%(process_num)d"', "autorestart=true",
                 "stopsignal=TERM", "stopwaitsecs=60", "stdout_logfile=/dev/stdout", "stdout_logfile_maxbytes=0",
                 "redirect_stderr=true", f"directory={REPO}"):
        assert line in section.splitlines()
    # supervisord expands %(...)s in commands: a literal % must reach the process intact.
    assert "--VllmWorker.served-model-name=100%%" in section
