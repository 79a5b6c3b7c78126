"""A vLLM engine's preparation: what it hands vLLM and Ray through the environment, from
the engine's own parsed arguments and the process it is about to start in."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from app.engines import vllm_process
from app.engines.base import EngineProcess
from app.engines.mocker import MockerEngine
from app.engines.vllm import VllmEngine

HANDED_OVER = (
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_NIXL_SIDE_CHANNEL_PORT",
    "VLLM_NIXL_SIDE_CHANNEL_HOST",
    "VLLM_CPU_KVCACHE_SPACE",
    "PYTHONFAULTHANDLER",
    "RAY_ADDRESS",
)
NIXL = '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}'  # as configs/cpu-tiny-disagg.yaml spells it


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> os._Environ[str]:
    """This process's environment without the variables under test (put back afterwards)."""
    for name in HANDED_OVER:
        monkeypatch.delenv(name, raising=False)
    return os.environ


@pytest.fixture(scope="module")
def on_cpu() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("these cases are about vLLM's CPU build")


def replica(index: int, **keys: Any) -> EngineProcess:
    return EngineProcess(replica=index, advertised_host="10.0.0.7", **keys)


async def test_a_nixl_engine_gets_its_replicas_cores_and_side_channel(environ: os._Environ[str], on_cpu: None) -> None:
    engine = VllmEngine.from_config({"model": "m", "kv-transfer-config": NIXL})
    await engine.prepare(replica(1, cpu_omp_threads_bind=["0", "1"], nixl_side_channel_port=5600))
    assert environ["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert (environ["VLLM_NIXL_SIDE_CHANNEL_HOST"], environ["VLLM_NIXL_SIDE_CHANNEL_PORT"]) == ("10.0.0.7", "5601")
    assert engine.nixl_side_channel() == "10.0.0.7:5601"  # what its process record advertises
    assert environ["VLLM_CPU_KVCACHE_SPACE"] == "1" and environ["PYTHONFAULTHANDLER"] == "1"
    assert "RAY_ADDRESS" not in environ


async def test_an_engine_without_nixl_or_binding_gets_neither(environ: os._Environ[str], on_cpu: None) -> None:
    environ["VLLM_CPU_KVCACHE_SPACE"] = "4"  # the operator's size stands
    engine = VllmEngine.from_config({"model": "m"})
    await engine.prepare(replica(0))
    assert engine.nixl_side_channel() == ""
    assert not {"VLLM_CPU_OMP_THREADS_BIND", "VLLM_NIXL_SIDE_CHANNEL_PORT", "VLLM_NIXL_SIDE_CHANNEL_HOST"} & set(
        environ
    )
    assert environ["VLLM_CPU_KVCACHE_SPACE"] == "4"


async def test_an_explicit_kv_cache_size_drops_the_cpu_variable(environ: os._Environ[str], on_cpu: None) -> None:
    environ["VLLM_CPU_KVCACHE_SPACE"] = "4"  # vLLM's CPU build would let it override the argument
    await VllmEngine.from_config({"model": "m", "kv-cache-memory-bytes": 8 << 20}).prepare(replica(0))
    assert "VLLM_CPU_KVCACHE_SPACE" not in environ


async def test_an_engine_on_ray_exports_the_cluster_it_waited_for(
    environ: os._Environ[str], on_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    waited: list[tuple] = []

    def wait_for_ray_devices(need: object, address: str | None, timeout_s: float) -> str:
        waited.append((need, address, timeout_s))
        return "10.0.0.1:6379"

    monkeypatch.setattr(vllm_process, "wait_for_ray_devices", wait_for_ray_devices)
    engine = VllmEngine.from_config({"model": "m", "tensor-parallel-size": 2, "distributed-executor-backend": "ray"})
    await engine.prepare(replica(0, ray_address="10.0.0.1:6379", ray_wait_timeout_s=30.0))
    assert [(address, timeout) for _, address, timeout in waited] == [("10.0.0.1:6379", 30.0)]
    assert environ["RAY_ADDRESS"] == "10.0.0.1:6379"


@pytest.mark.parametrize(
    ("config", "nixl"),
    [
        ({"kv_connector": "NixlConnector", "kv_role": "kv_both"}, True),
        (
            {
                "kv_connector": "MultiConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"connectors": [{"kv_connector": "NixlConnector", "kv_role": "kv_both"}]},
            },
            True,
        ),
        ({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}, False),
        (None, False),
    ],
)
def test_nixl_is_found_in_the_parsed_kv_transfer_config(config: dict | None, nixl: bool) -> None:
    from vllm.config import KVTransferConfig

    assert vllm_process.uses_nixl(None if config is None else KVTransferConfig(**config)) is nixl


@pytest.mark.parametrize(("set_in_config", "policy"), [({}, "recompute"), ({"kv_load_failure_policy": "fail"}, "fail")])
def test_a_failed_kv_pull_is_recomputed_unless_the_config_says_otherwise(set_in_config: dict, policy: str) -> None:
    # vLLM's own default is "fail": the request would end with an error on a lost pull.
    config = {"kv_connector": "NixlConnector", "kv_role": "kv_both", **set_in_config}
    for spelled in (config, json.dumps(config)):  # a mapping in YAML, or JSON as on vLLM's command line
        engine = VllmEngine.from_config({"model": "m", "kv-transfer-config": spelled})
        assert engine.engine_args["kv_transfer_config"].kv_load_failure_policy == policy


async def test_the_mocker_prepares_nothing(environ: os._Environ[str]) -> None:
    before = dict(environ)
    await MockerEngine.from_config({"model": "m"}).prepare(replica(0, cpu_omp_threads_bind=["0"]))
    assert dict(environ) == before
