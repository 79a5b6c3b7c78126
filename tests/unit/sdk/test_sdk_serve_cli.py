"""`tandem serve --dry-run` and `tandem config check` through the real console script."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.launch.devices import NodeDevices
from app.launch.supervisord import config_text
from app.sdk.config import load_config
from app.sdk.graph import resolve
from app.sdk.supervisor import plan, supervisord_programs

REPO = Path(__file__).resolve().parents[3]
TANDEM = str(Path(sys.executable).parent / "tandem")
CONFIG = "configs/multinode-405b.yaml"


def tandem(*args: str, devices: str | None = None) -> subprocess.CompletedProcess[str]:
    """`tandem ARGS` on a node whose devices are CUDA_VISIBLE_DEVICES=`devices` (None: none at all)."""
    environ = {**os.environ, "CUDA_VISIBLE_DEVICES": devices or ""}
    return subprocess.run([TANDEM, *args], cwd=REPO, env=environ, capture_output=True, text=True, timeout=60)


def dry_run(*args: str) -> dict[str, tuple[int, list[str]]]:
    """Service name -> (process count, command line) from the dry-run's lines."""
    done = tandem("serve", *args, "-f", CONFIG, "--dry-run")
    assert done.returncode == 0, done.stderr
    out = {}
    for line in done.stdout.splitlines():
        if line.startswith(" "):
            continue  # a replica's devices
        name, count, *command = line.split()
        out[name] = (int(count.removeprefix("x")), command)
    return out


@pytest.mark.parametrize(
    ("args", "services"),
    [
        # The Router runs inside the Frontend by default (test_where_the_routing_runs below).
        (["graphs.agg_router:Frontend"], ["Frontend", "Processor", "VllmWorker"]),
        (["graphs.disagg_router:Frontend"], ["Frontend", "Processor", "VllmWorker", "PrefillWorker"]),
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
        # Each process is told its graph: which of its dependencies are deployed.
        assert command[4:] == ["--graph", args[0], "-f", str(REPO / CONFIG)]


def test_dry_run_passes_overrides_to_every_process_and_honours_workers() -> None:
    listed = dry_run(
        "components.worker:VllmWorker", "--VllmWorker.ServiceArgs.workers=2", "--VllmWorker.remote-prefill=false"
    )
    count, command = listed["VllmWorker"]
    assert count == 2
    assert command[-2:] == ["--VllmWorker.ServiceArgs.workers=2", "--VllmWorker.remote-prefill=false"]


@pytest.mark.parametrize(
    ("overrides", "router_processes"),
    [
        ([], 0),  # the default: the Frontend is the router replica
        (["--Frontend.embed-router=true"], 0),
        (["--Router.ServiceArgs.workers=1"], 0),  # the default count: the Frontend is that replica
        (["--Router.ServiceArgs.workers=2"], 2),
        (["--Frontend.embed-router=false"], 1),
        (["--Frontend.embed-processor=false"], 1),  # the routing then happens in the Processor processes
        # An explicit embed-router wins over the Router's ServiceArgs (they no longer apply).
        (["--Frontend.embed-router=true", "--Router.ServiceArgs.workers=2"], 0),
    ],
)
def test_where_the_routing_runs(overrides: list[str], router_processes: int) -> None:
    for graph, workers in (
        ("graphs.agg_router:Frontend", ["VllmWorker"]),
        ("graphs.disagg_router:Frontend", ["VllmWorker", "PrefillWorker"]),
    ):
        listed = dry_run(graph, *overrides)
        expected = ["Frontend", "Processor", *(["Router"] if router_processes else []), *workers]
        assert list(listed) == expected, graph
        if router_processes:
            assert listed["Router"][0] == router_processes


def test_a_router_served_alone_runs_whatever_the_frontend_section_says() -> None:
    # The multi-node layout: one `tandem serve --service-name` per service; Frontends that
    # call Router processes (on another node) need it.
    for overrides in ([], ["--Frontend.embed-router=true"]):
        assert list(dry_run("graphs.agg_router:Frontend", "--service-name", "Router", *overrides)) == ["Router"]


def test_embed_router_without_the_embedded_processor_is_refused() -> None:
    done = tandem(
        "serve",
        "graphs.agg_router:Frontend",
        "-f",
        CONFIG,
        "--dry-run",
        "--Frontend.embed-router=true",
        "--Frontend.embed-processor=false",
    )
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


def test_supervisord_runs_each_replica_as_a_program_of_the_services_group(tmp_path: Path) -> None:
    _, spec = resolve("components.worker:VllmWorker")
    overrides = ["--VllmWorker.ServiceArgs.workers=2", "--VllmWorker.served-model-name=100%"]
    services, _ = plan(
        [spec], load_config(None, overrides), overrides[1:], NodeDevices((), "none"), "components.worker:VllmWorker"
    )
    conf = configparser.ConfigParser(interpolation=None)
    conf.read_string(config_text(supervisord_programs(services), tmp_path, REPO))
    assert conf["group:VllmWorker"]["programs"] == "VllmWorker_0,VllmWorker_1"
    for replica in (0, 1):
        program = conf[f"program:VllmWorker_{replica}"]
        assert program["environment"] == f'TANDEM_REPLICA="{replica}"'
        assert {
            k: program[k]
            for k in (
                "autorestart",
                "stopsignal",
                "stopwaitsecs",
                "stopasgroup",
                "directory",
                "stdout_logfile",
                "stdout_logfile_maxbytes",
                "redirect_stderr",
            )
        } == {
            "autorestart": "false",  # the restart listener's, after a backoff
            "stopsignal": "TERM",
            "stopwaitsecs": "60",
            "stopasgroup": "true",
            "directory": str(REPO),
            "stdout_logfile": "/dev/stdout",
            "stdout_logfile_maxbytes": "0",
            "redirect_stderr": "true",
        }
        # supervisord expands %(...)s in commands: a literal % must reach the process intact.
        assert program["command"].endswith("--VllmWorker.served-model-name=100%%")


GPU_GRAPH = ("components.worker:VllmWorker", "-f", CONFIG, "--dry-run", "--VllmWorker.ServiceArgs.workers=2")
EIGHT = ",".join(str(i) for i in range(8))


def test_each_replica_gets_its_own_gpus() -> None:
    done = tandem("serve", *GPU_GRAPH, "--VllmWorker.ServiceArgs.resources={gpu: 4}", devices=EIGHT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == [
        "  VllmWorker_0  CUDA_VISIBLE_DEVICES=0,1,2,3",
        "  VllmWorker_1  CUDA_VISIBLE_DEVICES=4,5,6,7",
    ]
    assert done.stderr == ""


def test_a_graph_asking_for_more_gpus_than_the_node_has_is_refused() -> None:
    done = tandem("serve", *GPU_GRAPH, "--VllmWorker.ServiceArgs.resources={gpu: 8}", devices=EIGHT)
    assert done.returncode == 1
    assert "asks for 16 GPUs (VllmWorker: 2 x 8) but this node has 8" in done.stderr
    assert "devices 8-15 are missing" in done.stderr
    # Without --dry-run, refused before anything starts (no supervisord, no config).
    done = tandem(
        "serve",
        *GPU_GRAPH[:3],
        "--VllmWorker.ServiceArgs.workers=2",
        "--VllmWorker.ServiceArgs.resources={gpu: 8}",
        devices=EIGHT,
    )
    assert done.returncode == 1 and "nothing started" in done.stderr and done.stdout == ""


def test_a_dry_run_without_gpus_prints_the_whole_plan_and_what_is_missing() -> None:
    done = tandem("serve", "graphs.agg_router:Frontend", "-f", CONFIG, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines() if line.startswith(" ")] == [
        f"  VllmWorker_0  CUDA_VISIBLE_DEVICES={EIGHT}"
    ]
    assert "note: the graph asks for 8 GPUs (VllmWorker: 1 x 8) but this node has 0" in done.stderr
    assert "devices 0-7 are missing here" in done.stderr
