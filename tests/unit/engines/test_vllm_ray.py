"""Which vLLM engines run on Ray, and what they need from the cluster."""

from __future__ import annotations

import pytest

from app.engines.vllm_cpu_ray import CPU_DEVICE_RESOURCE
from app.engines.vllm_ray import RayDevices, _missing, ray_devices_needed, with_ray_backend_if_needed, world_size


@pytest.fixture(scope="module")
def on_cpu() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("these cases are about vLLM's CPU build")


@pytest.mark.parametrize(
    ("args", "size"),
    [
        ({}, 1),
        ({"tensor_parallel_size": 16}, 16),
        ({"tensor-parallel-size": 8, "pipeline-parallel-size": 2}, 16),
        ({"tensor_parallel_size": 2, "prefill_context_parallel_size": 2}, 4),
    ],
)
def test_world_size_multiplies_the_parallel_sizes(args: dict, size: int) -> None:
    assert world_size(args) == size


def test_ray_backend_on_cpu_needs_one_cpu_worker_per_rank(on_cpu: None) -> None:
    need = ray_devices_needed({"tensor-parallel-size": 2, "distributed-executor-backend": "ray"})
    assert need == RayDevices(CPU_DEVICE_RESOURCE, 2)


@pytest.mark.parametrize(
    "args", [{}, {"tensor_parallel_size": 2}, {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}]
)
def test_cpu_engines_without_the_ray_backend_do_not_use_ray(on_cpu: None, args: dict) -> None:
    # On CPU, tensor parallelism within the node runs on vLLM's own processes.
    assert ray_devices_needed(args) is None
    assert with_ray_backend_if_needed(args) == args


def test_ray_backend_is_set_once_in_snake_case(on_cpu: None) -> None:
    args = {"tensor-parallel-size": 2, "distributed-executor-backend": "ray", "model": "m"}
    assert with_ray_backend_if_needed(args) == {
        "tensor-parallel-size": 2,
        "distributed_executor_backend": "ray",
        "model": "m",
    }


def test_missing_devices_message_names_count_resource_address_and_time() -> None:
    message = _missing(RayDevices("GPU", 16), "10.0.0.1:6379", True, 8.0, 1, 600, "")
    assert message.startswith("need 16 GPU in the Ray cluster at 10.0.0.1:6379, have 8 on 1 node(s) after 600 s")
    assert "tandem ray worker --address 10.0.0.1:6379" in message
    unreachable = _missing(RayDevices("GPU", 16), "10.0.0.1:6379", False, 0.0, 0, 600, "connection refused")
    assert "which did not answer within 600 s (connection refused)" in unreachable
