"""Every graph config the repository ships passes `tandem config check`; the seed's
multi-node files say what the guide promises."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.sdk.config import load_config
from app.sdk.graph import import_components
from app.sdk.service import SERVICES

REPO = Path(__file__).resolve().parents[3]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_passes_check_with_engine_arguments(path: Path) -> None:
    import_components()
    assert load_config(path).check(check_engine_args=True) == []


def test_config_check_command_accepts_the_seeds_misspelt_name() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("tandem")), "config", "check", "-f", "configs/mutinode_disagg_r1.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "OK: configs/mutinode_disagg_r1.yaml"


def test_seed_spelling_of_the_disagg_file_is_the_same_file() -> None:
    # The seed names it `mutinode_disagg_r1.yaml`; both names must keep serving one config.
    assert filecmp.cmp(
        REPO / "configs/mutinode_disagg_r1.yaml", REPO / "configs/multinode_disagg_r1.yaml", shallow=False
    )


def _worker(path: str, service: str):
    import_components()
    return load_config(REPO / path).service_config(SERVICES[service])


@pytest.mark.parametrize(
    ("path", "service"),
    [
        ("configs/multinode_agg_r1.yaml", "VllmWorker"),
        ("configs/multinode_disagg_r1.yaml", "VllmWorker"),
        ("configs/multinode_disagg_r1.yaml", "PrefillWorker"),
    ],
)
def test_r1_workers_span_two_nodes_on_ray(path: str, service: str) -> None:
    from app.engines.vllm_ray import world_size

    worker = _worker(path, service)
    assert worker.engine_args["model"] == "deepseek-ai/DeepSeek-R1"
    assert world_size(worker.engine_args) == 16  # two nodes of 8 GPUs
    assert worker.engine_args["distributed_executor_backend"] == "ray"
    assert worker.ray_wait_timeout_s > 0


def test_disagg_r1_decode_sends_long_prefills_to_the_prefill_cluster() -> None:
    decode = _worker("configs/multinode_disagg_r1.yaml", "VllmWorker")
    assert decode.remote_prefill
    assert "NixlConnector" in str(decode.engine_args["kv_transfer_config"])


def _key_paths(section: object, prefix: str = "") -> set[str]:
    if not isinstance(section, dict):
        return set()
    paths = set()
    for key, value in section.items():
        paths |= {f"{prefix}{key}", *_key_paths(value, f"{prefix}{key}.")}
    return paths


def test_the_cpu_disagg_ray_config_keeps_every_key_of_the_r1_disagg_config() -> None:
    """configs/cpu-tiny-disagg-ray.yaml (what tests/multinode/test_disagg_ray_clusters.py
    serves) is configs/mutinode_disagg_r1.yaml with small sizes: the same keys, less the
    two that have no CPU meaning (a GPU count; a reasoning parser for a model that thinks)."""
    r1 = yaml.safe_load((REPO / "configs/mutinode_disagg_r1.yaml").read_text())
    cpu = yaml.safe_load((REPO / "configs/cpu-tiny-disagg-ray.yaml").read_text())
    not_on_cpu = {"reasoning-parser", "resources"}
    assert set(cpu) == set(r1)
    for name, section in r1.items():
        wanted = {path for path in _key_paths(section) if not not_on_cpu & set(path.split("."))}
        assert wanted <= _key_paths(cpu[name]), (name, wanted - _key_paths(cpu[name]))
        shared = set(section.get("common-configs", [])) - not_on_cpu
        assert shared <= set(cpu[name].get("common-configs", [])), name
    # Each engine larger than one node of the scenario: one rank on each of its cluster's two nodes.
    assert cpu["Common"]["tensor-parallel-size"] == 2
    assert cpu["Common"]["distributed-executor-backend"] == r1["Common"]["distributed-executor-backend"] == "ray"
