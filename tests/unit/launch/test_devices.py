"""Which GPUs each replica gets, on nodes of a made-up size."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.launch import devices
from app.launch.devices import DeviceRequest, NodeDevices, assign_devices, node_devices


def node_of(count: int) -> NodeDevices:
    return NodeDevices(tuple(str(i) for i in range(count)), f"a node of {count}")


def test_replicas_take_consecutive_devices_of_their_own_across_services() -> None:
    plan = assign_devices(
        [DeviceRequest("Frontend", 1, 0), DeviceRequest("VllmWorker", 2, 2), DeviceRequest("PrefillWorker", 1, 3)],
        node_of(8),
    )
    assert plan.replicas == {
        "Frontend": [()],
        "VllmWorker": [("0", "1"), ("2", "3")],
        "PrefillWorker": [("4", "5", "6")],
    }
    assert plan.needed == 7 and plan.shortfall() is None


def test_four_each_for_two_replicas_on_a_node_of_eight() -> None:
    plan = assign_devices([DeviceRequest("VllmWorker", 2, 4)], node_of(8))
    assert plan.replicas["VllmWorker"] == [("0", "1", "2", "3"), ("4", "5", "6", "7")]
    assert plan.shortfall() is None


def test_more_than_the_node_has_names_the_counts_and_the_missing_devices() -> None:
    plan = assign_devices([DeviceRequest("VllmWorker", 2, 8)], node_of(8))
    # The plan goes on counting past the node's last device, so it can be shown whole.
    assert plan.replicas["VllmWorker"][1] == tuple(str(i) for i in range(8, 16))
    assert list(plan.missing()) == list(range(8, 16))
    assert plan.shortfall() == (
        "the graph asks for 16 GPUs (VllmWorker: 2 x 8) but this node has 8 (a node of 8): devices 8-15 are missing"
    )
    assert "devices 0-7 are missing" in str(assign_devices([DeviceRequest("VllmWorker", 1, 8)], node_of(0)).shortfall())


def test_a_service_asking_for_none_needs_none() -> None:
    plan = assign_devices([DeviceRequest("Router", 3, 0)], node_of(0))
    assert plan.replicas == {"Router": [(), (), ()]} and plan.shortfall() is None


def test_cuda_visible_devices_names_the_nodes_devices() -> None:
    assert node_devices({"CUDA_VISIBLE_DEVICES": "4,5, 7"}).ids == ("4", "5", "7")
    assert node_devices({"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d"}).ids == ("GPU-1a2b", "GPU-3c4d")
    # Empty hides every device, and CUDA stops at the first entry that names none.
    assert node_devices({"CUDA_VISIBLE_DEVICES": ""}).ids == ()
    assert node_devices({"CUDA_VISIBLE_DEVICES": "2,-1,3"}).ids == ("2",)
    plan = assign_devices([DeviceRequest("VllmWorker", 2, 1)], node_devices({"CUDA_VISIBLE_DEVICES": "6,3"}))
    assert plan.replicas["VllmWorker"] == [("6",), ("3",)]


def test_without_cuda_visible_devices_every_nvidia_device_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus = tmp_path / "gpus"
    for address in ("0000:3b:00.0", "0000:5e:00.0"):
        (gpus / address).mkdir(parents=True)
    monkeypatch.setattr(devices, "_PROC_GPUS", gpus)
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)  # no nvidia-smi
    assert node_devices({}) == NodeDevices(("0", "1"), str(gpus))
    monkeypatch.setattr(devices, "_PROC_GPUS", tmp_path / "absent")
    assert node_devices({}).ids == ()
