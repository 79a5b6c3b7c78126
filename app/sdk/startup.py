"""Start-up that tells where it is: one INFO line per phase of a process's start, each with
the seconds since the process started, all with one prefix an operator can grep for.

A worker (VllmWorker, PrefillWorker) logs, in this order (docs/operations.md, "Start-up"):

    start-up: connected to NATS and etcd after 0.4 s (instance 694d..., namespace dynamo)
    start-up: engine starting after 0.5 s (vllm)
    start-up: Ray cluster offers the engine's devices after 41.0 s (2 GPU at 10.0.0.1:6379)   [on Ray]
    start-up: engine ready after 58.3 s (vllm: model llama, block size 16, 40960 KV blocks)
    start-up: registered and routable after 58.4 s (generate, prefill_done, prefill_wanted)

Every other service logs the first line and the last. The runner (app/sdk/runner.py) logs
those two, the engine host (app/engines/host.py) the engine's.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "start-up:"

# The phases, in the order a worker goes through them.
CONNECTED = "connected to NATS and etcd"
ENGINE_STARTING = "engine starting"
RAY_DEVICES = "Ray cluster offers the engine's devices"
ENGINE_READY = "engine ready"
ROUTABLE = "registered and routable"  # its endpoints' instance records are in etcd: callers find it
REGISTERED = "registered"  # a service without endpoints (a Frontend serves HTTP only)


def _process_age_s() -> float | None:
    """How long ago the kernel started this process (Linux: /proc); None elsewhere.

    The interpreter's start and the imports before any of our code runs take a second or
    more on a loaded node: part of the start-up an operator waits for.
    """
    try:
        stat = Path(f"/proc/{os.getpid()}/stat").read_text()
        since_boot_s = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return None
    # Field 22, after the command name in parentheses (which may hold spaces): clock ticks since boot.
    started_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
    return max(since_boot_s - started_ticks / os.sysconf("SC_CLK_TCK"), 0.0)


_age = _process_age_s()
# When this process started, on time.monotonic()'s clock (else: when this module was imported).
STARTED = time.monotonic() - (_age or 0.0)


def elapsed_s() -> float:
    """Seconds since this process started."""
    return time.monotonic() - STARTED


def phase_text(phase: str, elapsed: float, detail: str = "") -> str:
    return f"{PREFIX} {phase} after {elapsed:.1f} s" + (f" ({detail})" if detail else "")


def phase(name: str, detail: str = "") -> None:
    """Log that this process reached phase `name` (one of the constants above) now."""
    log.info("%s", phase_text(name, elapsed_s(), detail))
