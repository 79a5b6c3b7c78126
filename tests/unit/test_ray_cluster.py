"""`tandem ray head|worker`: the `ray start` command each node runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.engines.vllm_cpu_ray import CPU_DEVICE_RESOURCE
from app.ray_cluster import RayStartError, is_cpu_build, ray_start_command, ray_start_env

TANDEM = str(Path(sys.executable).with_name("tandem"))


def _resources(command: list[str]) -> dict[str, float]:
    (arg,) = [a for a in command if a.startswith("--resources=")]
    return json.loads(arg.partition("=")[2])


def test_head_blocks_on_its_gcs_port_and_node_address_and_offers_cpu_workers() -> None:
    command = ray_start_command("head", port=46379, node_ip="10.0.0.1", device="cpu", cpu_workers=2)
    assert command[1:5] == ["start", "--head", "--port=46379", "--node-ip-address=10.0.0.1"]
    assert "--block" in command
    assert _resources(command) == {CPU_DEVICE_RESOURCE: 2}


def test_worker_joins_the_head_and_keeps_ray_start_arguments() -> None:
    command = ray_start_command(
        "worker",
        address="10.0.0.1:6379",
        node_ip="10.0.0.2",
        device="cpu",
        extra=["--num-cpus=4", "--resources", '{"disk": 1}'],
    )
    assert command[1:4] == ["start", "--address=10.0.0.1:6379", "--node-ip-address=10.0.0.2"]
    assert command[-1] == "--num-cpus=4"
    # Theirs and ours merged into one --resources (ray start takes the last one only).
    assert _resources(command) == {"disk": 1, CPU_DEVICE_RESOURCE: 1}


def test_gpu_nodes_offer_no_cpu_resource() -> None:
    command = ray_start_command("worker", address="10.0.0.1:6379", device="gpu", extra=["--num-gpus=8"])
    assert not any(a.startswith("--resources") for a in command)
    assert not any(a.startswith("--node-ip-address") for a in command)


def test_auto_device_follows_the_installed_vllm_build() -> None:
    command = ray_start_command("head")
    assert (CPU_DEVICE_RESOURCE in " ".join(command)) == is_cpu_build()


@pytest.mark.parametrize("port", [10002, 15000, 19999])
def test_head_port_inside_rays_worker_ports_is_refused(port: int) -> None:
    with pytest.raises(RayStartError, match="worker port range"):
        ray_start_command("head", port=port)


@pytest.mark.parametrize("address", [None, "", "10.0.0.1"])
def test_worker_needs_host_and_port(address: str | None) -> None:
    with pytest.raises(RayStartError, match="HOST:PORT"):
        ray_start_command("worker", address=address)


def test_bad_resources_json_is_refused() -> None:
    with pytest.raises(RayStartError, match="JSON"):
        ray_start_command("head", extra=["--resources={x"])


def test_env_carries_the_node_address_and_interfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    env = ray_start_env("10.0.0.2")
    assert env["VLLM_HOST_IP"] == "10.0.0.2"
    assert env["GLOO_SOCKET_IFNAME"] == "eth1"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"


def test_cli_reports_bad_arguments_without_starting_ray() -> None:
    result = subprocess.run([TANDEM, "ray", "head", "--port", "12000"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "worker port range" in result.stderr


def test_cli_help_documents_both_roles() -> None:
    result = subprocess.run([TANDEM, "ray", "worker", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for words in ("--address", "VLLM_HOST_IP", "GLOO_SOCKET_IFNAME", "tandem ray head", "never `ray stop`"):
        assert words in result.stdout
