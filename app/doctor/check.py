"""What every check of `tandem doctor` returns, and the `Fleet` the checks read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from app.protocol import LoadReport, ModelRecord, ProcessRecord, RouterReport, names
from app.runtime import QueueState


@dataclass(frozen=True)
class Check:
    """One check's verdict. `message` says what was found and, where it fails, what to do.
    `applicable` False: nothing to check in this fleet (ok, and said so)."""

    name: str
    ok: bool
    message: str
    applicable: bool = True

    @property
    def verdict(self) -> str:
        return "FAIL" if not self.ok else "PASS" if self.applicable else "SKIP"

    def to_builtins(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "verdict": self.verdict}


def passed(name: str, message: str) -> Check:
    return Check(name, True, message)


def failed(name: str, problems: list[str], fix: str = "") -> Check:
    return Check(name, False, "; ".join(problems) + (f". {fix}" if fix else ""))


def not_applicable(name: str, why: str) -> Check:
    return Check(name, True, f"not applicable: {why}", applicable=False)


@dataclass(frozen=True)
class ClockSample:
    """One reading of a process's wall clock against the doctor's: `offset_s` is how far its
    clock is ahead (negative: behind), known to within `error_s`."""

    instance_id: str
    offset_s: float
    error_s: float


@dataclass
class Fleet:
    """What the fleet published, as the doctor read it (`gather.gather_fleet`)."""

    namespace: str
    doctor_host: str  # the node the doctor runs on (its advertised address)
    processes: list[ProcessRecord]
    models: list[ModelRecord]
    routers: dict[str, RouterReport]  # router id -> its latest report
    loads: dict[str, LoadReport]  # worker id -> its latest report
    queue: QueueState | None  # the prefill queue (None: nobody opened it)
    max_payload: int  # the NATS server's, as its INFO told the doctor
    listened_s: float  # how long the doctor heard the fleet's reports and events
    kv_heard: set[str] = field(default_factory=set)  # workers whose KV event batches the doctor heard
    clocks: list[ClockSample] = field(default_factory=list)

    def of_service(self, service: str) -> list[ProcessRecord]:
        return [p for p in self.processes if p.service == service]

    def process(self, instance_id: str) -> ProcessRecord | None:
        return next((p for p in self.processes if p.instance_id == instance_id), None)

    def where(self, instance_id: str) -> str:
        """`ID on HOST`, for messages (the host where the process record says)."""
        process = self.process(instance_id)
        return f"{instance_id} on {process.host}" if process is not None else instance_id

    def worker_models(self) -> list[ModelRecord]:
        """The decode workers' model records (what routers route to)."""
        return [m for m in self.models if m.service == names.VLLM_WORKER]
