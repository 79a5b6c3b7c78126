"""The process a vLLM engine starts in, made ready by `VllmEngine.prepare`.

vLLM and Ray take several settings only from the environment, and the engine core and its
workers inherit this process's environment when they spawn. Every variable Tandem writes
for them is written here, once, right before the engine starts:

- VLLM_CPU_OMP_THREADS_BIND: this replica's cores (`cpu-omp-threads-bind`, by replica).
- VLLM_NIXL_SIDE_CHANNEL_PORT / _HOST: this engine's own NIXL side channel.
- VLLM_CPU_KVCACHE_SPACE: a small default KV cache on CPU where the config gives no size.
- PYTHONFAULTHANDLER: Python stacks of a native crash in the engine's processes.
- RAY_ADDRESS: the Ray cluster an engine larger than its node runs on, once it offers the devices.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from app import env
from app.engines.base import EngineProcess
from app.engines.vllm_ray import ray_devices_needed, wait_for_ray_devices
from app.launch.leftovers import guard_descendants
from app.launch.ports import free_port
from app.sdk import startup

log = logging.getLogger(__name__)

# vLLM's CPU build sizes its KV cache to 92 % of a NUMA node by default and refuses to
# start on a shared machine; an empty value crashes it. GPU builds never read it.
_DEFAULT_CPU_KVCACHE_SPACE_GIB = "1"


@dataclass(frozen=True)
class PreparedProcess:
    # Ends the engine's processes if this one dies (None without a leftovers record).
    guard: subprocess.Popen[bytes] | None
    # HOST:PORT of the engine's NIXL side channel ("": it uses no NIXL); vLLM adds the
    # data-parallel index to the port.
    nixl_side_channel: str = ""


async def prepare_vllm_process(engine_args: dict[str, Any], process: EngineProcess) -> PreparedProcess:
    """`engine_args` as the engine will pass them to vLLM (nested configs parsed)."""
    guard = None
    side_channel = ""
    if process.leftovers_record is not None:
        # Before anything else: a predecessor's engine still holding the device ends first.
        guard = await asyncio.to_thread(guard_descendants, process.leftovers_record)
    binds = process.cpu_omp_threads_bind
    if binds:
        # Each replica on its own cores: two CPU engines sharing one decoded at ~35 ms per
        # token, on a core each at ~12 ms (docs/benchmarks.md, "Aggregated vs disaggregated
        # (vLLM CPU, tiny model)").
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binds[process.replica % len(binds)]
    if uses_nixl(engine_args.get("kv_transfer_config")):
        side_channel = _set_nixl_side_channel(process)
    _size_cpu_kv_cache(engine_args)
    # The engine core and its worker processes inherit it: a native crash there (a
    # signal, no Python exception) then prints every thread's Python stack to the log
    # instead of only vLLM's "died unexpectedly" (docs/internals.md, "bfloat16 KV ...").
    # (The variable for spawned processes, enable() for forked ones.)
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    faulthandler.enable()
    need = ray_devices_needed(engine_args)
    if need is not None:
        # In a thread: the wait may take minutes, and the process must keep its etcd lease.
        address = await asyncio.to_thread(wait_for_ray_devices, need, process.ray_address, process.ray_wait_timeout_s)
        startup.phase(startup.RAY_DEVICES, f"{need.count} {need.resource} at {address}")
        # vLLM's engine then connects to this very cluster instead of starting a private one.
        os.environ["RAY_ADDRESS"] = address
    return PreparedProcess(guard, side_channel)


def uses_nixl(kv_transfer_config: Any) -> bool:
    """Whether the engine's KV connector is NIXL's, alone or among a MultiConnector's
    (`kv_transfer_config`: vLLM's parsed KVTransferConfig, or None)."""
    if kv_transfer_config is None:
        return False
    chained = kv_transfer_config.kv_connector_extra_config.get("connectors", ())
    connectors = [kv_transfer_config.kv_connector, *(connector.get("kv_connector") for connector in chained)]
    return "NixlConnector" in connectors


def _set_nixl_side_channel(process: EngineProcess) -> str:
    """Give this engine its own NIXL side channel (engines on one host must not share a port).

    The host is where the prefill side listens and what it tells decode engines to dial:
    the address this process advertises in its instance records (app.node.node_address),
    so that records and KV hand-offs never disagree.
    """
    base_port = process.nixl_side_channel_port
    port = base_port + process.replica if base_port else free_port()
    os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(port)
    if not env.VLLM_NIXL_SIDE_CHANNEL_HOST.get():
        os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = process.advertised_host
    channel = f"{env.VLLM_NIXL_SIDE_CHANNEL_HOST.get()}:{port}"
    log.info("NIXL side channel on %s", channel)
    return channel


def _size_cpu_kv_cache(engine_args: dict[str, Any]) -> None:
    if engine_args.get("kv_cache_memory_bytes") is not None:
        # vLLM's CPU platform lets the (whole-GiB) environment variable override the
        # engine argument; the config's explicit size must win, e.g. a few MiB for
        # each of three small engines on one machine.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    elif not env.VLLM_CPU_KVCACHE_SPACE.get():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = _DEFAULT_CPU_KVCACHE_SPACE_GIB
