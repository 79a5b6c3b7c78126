"""vLLM's Ray executor (V2) for the CPU build; chosen by the `vllm_cpu_ray` plugin.

Imported only where a CPU engine runs on Ray (it imports Ray and vLLM's executor).
"""

from __future__ import annotations

from vllm.v1.executor import ray_executor_v2
from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc


class CpuRayWorkerProc(RayWorkerProc):
    """A vLLM worker actor on a CPU node."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        # The stock actor looks its device ids up among Ray's accelerator ids, where a
        # custom resource never appears. CPU workers have no device ids: each binds its
        # threads itself (or not at all), so "none" is the true answer.
        import ray

        return ray.get_runtime_context().get_node_id(), []


class CpuRayExecutor(RayExecutorV2):
    def _init_executor(self) -> None:
        # RayExecutorV2 creates its actors from the module's RayWorkerProc: point that at
        # the CPU worker class while the actors are created, and put it back afterwards.
        stock = ray_executor_v2.RayWorkerProc
        ray_executor_v2.RayWorkerProc = CpuRayWorkerProc  # type: ignore[misc]  # the swap itself
        try:
            super()._init_executor()
        finally:
            ray_executor_v2.RayWorkerProc = stock  # type: ignore[misc]
