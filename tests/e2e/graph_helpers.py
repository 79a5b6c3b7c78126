"""What the end-to-end tests read off a graph that bench/harness/launch.py's ServedGraph serves."""

from __future__ import annotations

import time

import psutil

from bench.harness.launch import ServedGraph


def engine_core_of(worker_pid: int) -> psutil.Process:
    """The `VLLM::EngineCore` process that a worker process started (vLLM names it so)."""
    for child in psutil.Process(worker_pid).children():
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
            return child
    raise AssertionError(f"worker {worker_pid} has no EngineCore child")


def prefill_decision(graph: ServedGraph, request_id: str, timeout: float = 5.0) -> str:
    """The decode worker's logged decision for a request: local, remote or fallback.

    supervisord relays the worker's output into the log a moment later (it polls the
    pipes): a response can reach the client before its decision line reaches the file.
    """
    marker = f"request {request_id}: prefill "
    deadline = time.monotonic() + timeout
    while True:
        for line in graph.log_path.read_text(errors="replace").splitlines():
            if marker in line:
                return line.split(marker, 1)[1].split(" ", 1)[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no prefill decision logged for {request_id}:\n{graph.log_tail()}")
        time.sleep(0.2)
