"""vLLM general plugin: tensor/pipeline parallelism over a Ray cluster on vLLM's CPU build.

vLLM 0.32's CPU platform refuses Ray (`current platform cpu does not support ray.`): Ray
places vLLM workers by a device resource ("GPU" on CUDA) and the CPU platform names none.
This plugin gives it one, `CPU_DEVICE_RESOURCE`, which every CPU node of the cluster
declares when it joins (`tandem ray head|worker` do: one unit per vLLM worker the node
hosts). Registered under the `vllm.general_plugins` entry point, so vLLM loads it in every
process it starts (API process, engine core, workers), for Tandem and for plain vLLM alike.

On any other platform it does nothing: CUDA supports Ray as shipped.

This module is imported by every vLLM process; it imports vLLM only inside `register`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.platforms.interface import Platform

log = logging.getLogger(__name__)

# The Ray resource a CPU node offers per vLLM worker it can host (a tensor/pipeline rank).
CPU_DEVICE_RESOURCE = "vllm_cpu_worker"


def register() -> None:
    """vLLM calls this once per process (several times is harmless: every patch is idempotent)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    _name_the_cpu_ray_device(type(current_platform))
    _keep_shm_all_reduce_within_one_host()
    _resolve_ray_executor_to_cpu_variant()


def _name_the_cpu_ray_device(platform: type[Platform]) -> None:
    # vLLM asks Ray for one bundle of `ray_device_key` per worker and refuses Ray where the
    # key is empty, as it is on CPU. Naming our resource makes the placement group ask for
    # one CPU worker slot per rank, spread over the nodes that declared slots.
    platform.ray_device_key = CPU_DEVICE_RESOURCE


def shm_domain() -> str:
    """Identifies the /dev/shm this process sees: equal for processes that share one.

    The boot id tells machines apart; the device number of /dev/shm tells apart
    containers (or network-namespace "nodes") that mount their own tmpfs there.
    """
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{boot_id}-{os.stat('/dev/shm').st_dev:x}"


def _keep_shm_all_reduce_within_one_host() -> None:
    from vllm.distributed.device_communicators import cpu_communicator

    shm_class = cpu_communicator._CPUSHMDistributed
    original = shm_class.make_group_name
    if getattr(original, "_tandem_patched", False):
        return

    # The CPU all-reduce goes through a shared-memory segment whose name derives from the
    # torch.distributed port and the group's ranks only. Ranks on two hosts compute the
    # same name, and each then opens a segment that exists only on the other host:
    # `open shm in SHMManager failed. errno: 2`. With the host's shm domain in the name,
    # vLLM's own check (every rank of the group must compute one name) sees the mismatch
    # and falls back to torch.distributed, i.e. gloo over TCP (GLOO_SOCKET_IFNAME picks the
    # interface).
    def make_group_name(communicator: cpu_communicator.CpuCommunicator) -> str:
        return f"{original(communicator)}-{shm_domain()}"

    make_group_name._tandem_patched = True  # type: ignore[attr-defined]
    shm_class.make_group_name = staticmethod(make_group_name)  # type: ignore[method-assign]  # the patch


def _resolve_ray_executor_to_cpu_variant() -> None:
    from vllm.v1.executor import abstract

    original = abstract.Executor.get_class
    if getattr(original, "_tandem_patched", False):
        return

    # vLLM's Ray executor asks each worker actor for its accelerator ids, which Ray keeps
    # for accelerator resources only (a custom resource has none: KeyError). The CPU
    # variant answers "no ids". Resolving the executor class here (the API process) is
    # enough: the class travels to the engine core by reference, so the core imports the
    # CPU variant too, and the actors run its worker class.
    def get_class(vllm_config: object) -> type:
        executor = original(vllm_config)
        if executor.__name__ == "RayExecutorV2":
            from app.engines.vllm_cpu_ray_executor import CpuRayExecutor

            return CpuRayExecutor
        if executor.__name__ == "RayDistributedExecutor":
            raise ValueError(
                "vLLM's CPU build runs on Ray with the V2 Ray executor only: "
                "unset VLLM_USE_RAY_V2_EXECUTOR_BACKEND (or set it to 1)"
            )
        return executor

    get_class._tandem_patched = True  # type: ignore[attr-defined]
    abstract.Executor.get_class = staticmethod(get_class)
