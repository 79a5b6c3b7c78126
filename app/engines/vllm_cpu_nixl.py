"""vLLM general plugin: vLLM's NIXL connector on the CPU build, fit for several engines per node.

Two things vLLM's NixlConnector does on CPU assume one engine per machine:

- Core pinning. Its worker moves the engine worker's main thread onto "the last core of
  each NUMA node", to keep KV transfers off the cores that compute. With OMP_NUM_THREADS
  of 1 that thread is also the one that computes, and every NIXL engine on the node lands
  on the same core whatever `cpu-omp-threads-bind` said: a decode and a prefill engine
  then shared core 1 here, and while the prefill engine busy-polled for its KV to be
  pulled, the decode engine got too little of the core to pull it until the prefill
  side's 30 s KV lease ran out (docs/internals.md, "NIXL on vLLM's CPU build"). With the
  plugin the reserved core is the last of the engine's own OpenMP cores (OMP_PLACES or
  GOMP_CPU_AFFINITY, which vLLM sets from VLLM_CPU_OMP_THREADS_BIND); without such a
  binding it is the last of each NUMA node's cores that the process may run on.
- The UCX progress thread. NIXL's Python agent hard-codes its poll delay to 0 µs
  (`pthrDelay = 0`): the thread busy-polls, a whole core per engine process even idle
  (measured here: 1 s user + 4 s system per 5 s idle, for each NixlConnector engine).
  With a delay the thread still wakes on UCX events, so transfers are not slower (a
  4 MiB read over TCP took the same ~15 ms either way), and it polls at most every
  TANDEM_NIXL_PROGRESS_DELAY_US (app/env.py: 100 ms) when nothing happens.

Registered under the `vllm.general_plugins` entry point; does nothing off the CPU platform.
The NIXL patch applies only when vLLM first loads NIXL, so processes without a
NixlConnector never import it.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from typing import Any

from app import env

log = logging.getLogger(__name__)


def register() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    reserve_kv_core_within_engine_cores(type(current_platform))
    if progress_thread_delay_us() == 0:
        return
    from vllm.distributed import nixl_utils

    original = nixl_utils._load_nixl_attr
    if getattr(original, "_tandem_patched", False):
        return

    def load_nixl_attr(name: str) -> Any:
        value = original(name)
        if name == "NixlWrapper" and value is not None:
            delay_progress_thread(importlib.import_module(value.__module__))
        return value

    load_nixl_attr._tandem_patched = True  # type: ignore[attr-defined]
    nixl_utils._load_nixl_attr = load_nixl_attr


def engine_cores() -> list[int] | None:
    """The cores vLLM's OpenMP binding gave this engine worker process, or None if unbound.

    vLLM writes them into the worker's environment when it spawns it: OMP_PLACES="{0,1}"
    (libgomp via OMP_PROC_BIND) or GOMP_CPU_AFFINITY="0 1" (a preloaded libgomp).
    """
    places = env.OMP_PLACES.get() or env.GOMP_CPU_AFFINITY.get() or ""
    if not re.fullmatch(r"\{?\s*\d+(\s*[, ]\s*\d+)*\s*\}?", places.strip()):
        return None
    return [int(core) for core in re.findall(r"\d+", places)]


def reserve_kv_core_within_engine_cores(platform_class: Any) -> None:
    """Make the NIXL worker's "core reserved for KV transfers" one of the engine's own cores.

    `discover_numa_topology` exists for that reservation alone (NixlConnector's worker pins
    its thread to the largest core of each group it returns); an engine bound to its own
    cores gets those cores as its one group.
    """
    original = platform_class.discover_numa_topology
    if getattr(original, "_tandem_patched", False):
        return

    def discover_numa_topology(cls: Any) -> list[list[int]]:
        cores = engine_cores()
        if cores:
            return [cores]
        # Unbound (a vLLM worker that Ray started: vLLM binds only the workers it spawns
        # itself), the engine still keeps to the cores it was given (taskset, a cpuset):
        # vLLM's last core of each NUMA node put every rank of two Ray nodes sharing a
        # machine on that one core (tests/multinode/test_disagg_ray_clusters.py).
        allowed = os.sched_getaffinity(0)
        groups = [[core for core in group if core in allowed] for group in original()]
        return [group for group in groups if group] or original()

    discover_numa_topology._tandem_patched = True  # type: ignore[attr-defined]
    platform_class.discover_numa_topology = classmethod(discover_numa_topology)


def progress_thread_delay_us() -> int:
    return env.TANDEM_NIXL_PROGRESS_DELAY_US.get()


def delay_progress_thread(nixl_api: Any) -> None:
    """Make every agent that `nixl_api.nixl_agent` creates poll with a delay instead of spinning."""
    bindings = nixl_api.nixlBind
    create_agent = bindings.nixlAgent
    delay_us = progress_thread_delay_us()
    if getattr(create_agent, "_tandem_patched", False):
        return

    def nixl_agent(name: str, config: Any) -> Any:
        if config.useProgThread and config.pthrDelay == 0:
            config.pthrDelay = delay_us
        return create_agent(name, config)

    nixl_agent._tandem_patched = True  # type: ignore[attr-defined]
    bindings.nixlAgent = nixl_agent
    log.info(
        "NIXL progress threads poll every %d µs at most on this CPU build (NIXL's default: spin; %s)",
        delay_us,
        env.TANDEM_NIXL_PROGRESS_DELAY_US.name,
    )
