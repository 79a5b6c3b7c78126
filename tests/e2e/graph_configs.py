"""The `graphs.agg_router:Frontend` config the end-to-end tests serve the tiny model with:
Processor, a KV-aware Router (inside the Frontend by default) and one VllmWorker service,
float32, eager."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL = "tiny-llama"
BLOCK_SIZE = 32


def agg_router_config(
    model: Path,
    max_model_len: int,
    worker: dict[str, Any],
    frontend: dict[str, Any] | None = None,
    router_processes: int | None = None,
) -> dict[str, Any]:
    """`worker` and `frontend` add to the VllmWorker's and the Frontend's own keys.
    `router_processes`: that many Router processes (their ServiceArgs, and the Frontend's
    `embed-router: false`, which one alone needs), which a Frontend with `embed-processor:
    false` needs (its Processor service calls them); None: the default, the router inside
    the Frontend."""
    common = {"model": str(model), "served-model-name": MODEL, "block-size": BLOCK_SIZE, "max-model-len": max_model_len}
    router: dict[str, Any] = {"policy": "kv", "common-configs": ["model", "block-size"]}
    frontend = {"served-model-name": MODEL, **(frontend or {})}
    if router_processes is not None:
        router["ServiceArgs"] = {"workers": router_processes}
        frontend["embed-router"] = False
    return {
        "Common": common,
        "Frontend": frontend,
        "Processor": {"common-configs": ["model", "max-model-len"]},
        "Router": router,
        "VllmWorker": {
            "engine": "vllm",
            "enforce-eager": True,
            "dtype": "float32",
            **worker,
            "common-configs": ["model", "served-model-name", "block-size", "max-model-len"],
        },
    }


def ray_tensor_parallel_2(ray_address: str, wait_timeout_s: int) -> dict[str, Any]:
    """The VllmWorker keys of tensor parallel 2 on vLLM's Ray executor, one rank per Ray node."""
    return {
        "tensor-parallel-size": 2,
        "distributed-executor-backend": "ray",
        "ray-address": ray_address,
        "ray-wait-timeout-s": wait_timeout_s,
    }
