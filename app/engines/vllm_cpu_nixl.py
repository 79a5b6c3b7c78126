"""vLLM general plugin: NIXL's UCX progress thread sleeps between events on vLLM's CPU build.

NIXL's Python agent hard-codes the progress thread's poll delay to 0 µs (`pthrDelay = 0`):
the thread busy-polls. On a GPU server that buys latency with a spare core; on a CPU
server it takes a whole core per engine process from the engines themselves, even idle
(measured here: 1 s user + 4 s system per 5 s idle, for each NixlConnector engine).
With a delay the thread still wakes on UCX events, so transfers are not slower
(`docs/internals.md`, "NIXL on vLLM's CPU build": a 4 MiB read over TCP took the same
~15 ms either way), and it polls at most every `PROGRESS_THREAD_DELAY_US` when nothing
happens.

Registered under the `vllm.general_plugins` entry point; does nothing off the CPU platform.
The patch applies only when vLLM first loads NIXL, so processes without a NixlConnector
never import it.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# TANDEM_NIXL_PROGRESS_DELAY_US overrides it; 0 keeps NIXL's spinning thread.
PROGRESS_THREAD_DELAY_US = 100_000
DELAY_ENV = "TANDEM_NIXL_PROGRESS_DELAY_US"


def register() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or progress_thread_delay_us() == 0:
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


def progress_thread_delay_us() -> int:
    return int(os.environ.get(DELAY_ENV) or PROGRESS_THREAD_DELAY_US)


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
    log.info("NIXL progress threads poll every %d µs at most on this CPU build (NIXL's default: spin; %s)",
             delay_us, DELAY_ENV)
