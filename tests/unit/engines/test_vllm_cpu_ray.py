"""The vLLM CPU + Ray plugin: what it changes in vLLM, and that vLLM finds it."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace
from typing import cast

import pytest

from app.engines import vllm_cpu_ray
from app.engines.vllm_cpu_ray import CPU_DEVICE_RESOURCE, shm_domain
from tests.capabilities import require_root_unshare


@pytest.fixture(scope="module")
def registered() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the plugin changes vLLM's CPU platform only")
    vllm_cpu_ray.register()
    vllm_cpu_ray.register()  # vLLM may load plugins more than once per process


def test_vllm_finds_the_plugin_through_its_entry_point() -> None:
    (plugin,) = [p for p in entry_points(group="vllm.general_plugins") if p.name == "tandem_cpu_ray"]
    assert plugin.load() is vllm_cpu_ray.register


def test_cpu_platform_names_the_ray_resource_of_its_workers(registered: None) -> None:
    from vllm.platforms import current_platform

    assert current_platform.ray_device_key == CPU_DEVICE_RESOURCE


def _executor_for(backend: str) -> type:
    from vllm.v1.executor.abstract import Executor

    return Executor.get_class(SimpleNamespace(parallel_config=SimpleNamespace(distributed_executor_backend=backend)))


def test_ray_backend_resolves_to_the_cpu_ray_executor(registered: None) -> None:
    from app.engines.vllm_cpu_ray_executor import CpuRayExecutor

    assert _executor_for("ray") is CpuRayExecutor
    assert _executor_for("mp").__name__ == "MultiprocExecutor"


def test_ray_v1_executor_is_refused_with_the_fix(registered: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_USE_RAY_V2_EXECUTOR_BACKEND", "0")
    with pytest.raises(ValueError, match="VLLM_USE_RAY_V2_EXECUTOR_BACKEND"):
        _executor_for("ray")


def test_shm_all_reduce_group_name_carries_the_hosts_shm_domain(
    registered: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator, _CPUSHMDistributed

    monkeypatch.setenv("VLLM_DIST_IDENT", "29500")
    # A stand-in with the two attributes make_group_name reads.
    communicator = cast(CpuCommunicator, SimpleNamespace(unique_name="tp:0", ranks=[0, 1]))
    name = _CPUSHMDistributed.make_group_name(communicator)
    assert name.startswith("29500-tp:0-[0-1]-cpushm")
    assert name.endswith(shm_domain())


def test_a_node_with_its_own_dev_shm_has_another_shm_domain() -> None:
    require_root_unshare()
    # What a second host (or a container, or a test's network-namespace node) looks like.
    probe = (
        f"mount -t tmpfs tmpfs /dev/shm && "
        f"{sys.executable} -c 'from app.engines.vllm_cpu_ray import shm_domain; print(shm_domain())'"
    )
    other = subprocess.run(
        ["unshare", "--mount", "sh", "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    same = subprocess.run(
        [sys.executable, "-c", "from app.engines.vllm_cpu_ray import shm_domain; print(shm_domain())"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert same.stdout.strip() == shm_domain()
    assert other.stdout.strip() != shm_domain()
