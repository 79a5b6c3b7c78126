"""Which GPUs each replica gets: `ServiceArgs.resources.gpu: N` gives every replica of a
service N devices of its own, through CUDA_VISIBLE_DEVICES, as `dynamo serve` did.

The node's devices are CUDA_VISIBLE_DEVICES where it is set, else every NVIDIA device
(`nvidia-smi -L`, else /proc/driver/nvidia/gpus): no CUDA library is needed to count them.
Replicas take consecutive devices in the order of the graph's services; a service that
asks for none is left with the devices its environment gives it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app import env

_PROC_GPUS = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class NodeDevices:
    ids: tuple[str, ...]  # what CUDA_VISIBLE_DEVICES may name, in order
    source: str  # where they were counted, for messages


@dataclass(frozen=True)
class DeviceRequest:
    service: str
    replicas: int
    per_replica: int


@dataclass(frozen=True)
class DeviceAssignment:
    node: NodeDevices
    # Service -> one tuple per replica: its devices (empty: the service asked for none).
    replicas: dict[str, list[tuple[str, ...]]]
    requests: tuple[DeviceRequest, ...]

    @property
    def needed(self) -> int:
        return sum(r.replicas * r.per_replica for r in self.requests)

    def missing(self) -> range:
        """Positions, among the devices the plan hands out, that this node does not have."""
        return range(len(self.node.ids), max(self.needed, len(self.node.ids)))

    def shortfall(self) -> str | None:
        """Why this node cannot run the plan, naming the counts; None where it can."""
        missing = self.missing()
        if not missing:
            return None
        asks = ", ".join(f"{r.service}: {r.replicas} x {r.per_replica}" for r in self.requests if r.per_replica)
        gone = str(missing.start) if len(missing) == 1 else f"{missing.start}-{missing.stop - 1}"
        return (
            f"the graph asks for {self.needed} GPUs ({asks}) but this node has {len(self.node.ids)} "
            f"({self.node.source}): devices {gone} are missing"
        )


def node_devices(environ: Mapping[str, str] | None = None) -> NodeDevices:
    """The devices this node may hand out."""
    visible = env.CUDA_VISIBLE_DEVICES.get(environ)
    if visible is not None:
        ids: list[str] = []
        for part in (p.strip() for p in visible.split(",")):
            # CUDA stops at the first entry that names no device ("-1" hides them all).
            if not part or part.startswith("-"):
                break
            ids.append(part)
        return NodeDevices(tuple(ids), f"CUDA_VISIBLE_DEVICES={visible!r}")
    count, source = _nvidia_device_count()
    return NodeDevices(tuple(str(i) for i in range(count)), source)


def _nvidia_device_count() -> tuple[int, str]:
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is not None:
        try:
            listed = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=30, check=True)
            # One "GPU i: ..." line per device; MIG instances are listed indented under theirs.
            return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()), "nvidia-smi -L"
        except (OSError, subprocess.SubprocessError):
            pass
    if _PROC_GPUS.is_dir():
        return len(list(_PROC_GPUS.iterdir())), str(_PROC_GPUS)
    return 0, "no NVIDIA driver found"


def assign_devices(requests: Sequence[DeviceRequest], node: NodeDevices) -> DeviceAssignment:
    """Consecutive devices for each replica, in the order of `requests`.

    Past the node's last device the plan goes on counting (device 8, 9, ... of a node of 8),
    so that it can be shown in full where devices are missing (`missing()`).
    """
    replicas: dict[str, list[tuple[str, ...]]] = {}
    position = 0
    for request in requests:
        mine = []
        for _ in range(request.replicas):
            taken = range(position, position + request.per_replica)
            mine.append(tuple(node.ids[p] if p < len(node.ids) else str(p) for p in taken))
            position = taken.stop
        replicas[request.service] = mine
    return DeviceAssignment(node, replicas, tuple(requests))
