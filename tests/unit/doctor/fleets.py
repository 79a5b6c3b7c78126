"""Fleets for the doctor's checks, built from the records and reports a fleet publishes."""

from __future__ import annotations

from typing import Any

from app.doctor.check import ClockSample, Fleet
from app.protocol import KV_HASH_SCHEME, LoadReport, ModelRecord, ProcessRecord, RouterReport, names
from app.runtime import QueueState

MODEL = "tiny-llama"


def process(instance_id: str, service: str, host: str = "10.0.0.1", **fields: Any) -> ProcessRecord:
    values: dict[str, Any] = {"tandem_version": "0.1.0", "vllm_version": "0.32.0", **fields}
    return ProcessRecord(
        instance_id=instance_id, service=service, replica=0, host=host, pid=7, started_at=1.0, **values
    )


def worker_model(
    instance_id: str, block_size: int = 16, model: str = MODEL, max_model_len: int = 2048, **info: Any
) -> ModelRecord:
    metadata = {
        "name": model,
        "max_model_len": max_model_len,
        "block_size": block_size,
        "kv_hash_scheme": KV_HASH_SCHEME,
        **info,
    }
    return ModelRecord(
        name=model, instance_id=instance_id, service=names.VLLM_WORKER, endpoint=names.GENERATE, metadata=metadata
    )


def router_report(router_id: str, block_size: int = 16, **fields: Any) -> RouterReport:
    values: dict[str, Any] = {"hash_scheme": KV_HASH_SCHEME, "model": MODEL, "timestamp": 1.0, **fields}
    return RouterReport(router_id=router_id, policy="kv", block_size=block_size, **values)


def fleet(
    processes: list[ProcessRecord],
    models: list[ModelRecord] = (),  # type: ignore[assignment]
    routers: list[RouterReport] = (),  # type: ignore[assignment]
    *,
    loads: list[LoadReport] = (),  # type: ignore[assignment]
    queue: QueueState | None = None,
    max_payload: int = 1024 * 1024,
    kv_heard: set[str] | None = None,
    clocks: list[ClockSample] = (),  # type: ignore[assignment]
) -> Fleet:
    return Fleet(
        namespace="ns",
        doctor_host="10.0.0.9",
        processes=list(processes),
        models=list(models),
        routers={r.router_id: r for r in routers},
        loads={r.worker_id: r for r in loads},
        queue=queue,
        max_payload=max_payload,
        listened_s=3.0,
        kv_heard=kv_heard or set(),
        clocks=list(clocks),
    )


def healthy(workers: int = 4, routers: int = 2, **changes: Any) -> Fleet:
    """The mocker graph's shape: workers w0.., routers r0.., all on one node, blocks of 16."""
    worker_ids = [f"w{i}" for i in range(workers)]
    router_ids = [f"r{i}" for i in range(routers)]
    return fleet(
        [process(w, names.VLLM_WORKER) for w in worker_ids] + [process(r, names.ROUTER) for r in router_ids],
        [worker_model(w) for w in worker_ids],
        [router_report(r) for r in router_ids],
        **changes,
    )
