"""The NIXL plugin for vLLM's CPU build: agents made the way vLLM makes them stop spinning, and still transfer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import app.env
from app.engines import vllm_cpu_nixl

# Run in a child: the patch changes process-wide modules (vLLM's NIXL loader, NIXL's bindings).
# The child loads vLLM's plugins as every vLLM process does, makes two agents through vLLM's
# own loader as its NixlConnector does, reads the target agent's memory from the other one
# over UCX, then idles and reports the CPU time that took.
AGENTS_IDLE_THEN_TRANSFER = textwrap.dedent("""
    import resource, time
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    from vllm.distributed import nixl_utils
    import torch

    def agent(name):
        return nixl_utils.NixlWrapper(name, nixl_utils.nixl_agent_config(num_threads=4, capture_telemetry=True))

    target, reader = agent("target"), agent("reader")
    source, sink = torch.arange(1 << 16, dtype=torch.float32), torch.zeros(1 << 16)
    target.register_memory([source]); reader.register_memory([sink])
    peer = reader.add_remote_agent(target.get_agent_metadata())
    remote = reader.get_xfer_descs([(source.data_ptr(), source.numel() * 4, 0)], "DRAM")
    handle = reader.initialize_xfer("READ", reader.get_xfer_descs([sink]), remote, peer)
    state = reader.transfer(handle)
    deadline = time.monotonic() + 30
    while (state := reader.check_xfer_state(handle)) == "PROC" and time.monotonic() < deadline:
        time.sleep(0.001)
    assert state == "DONE", state
    assert torch.equal(sink, source)
    before = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(3)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
""")


def _idle_cpu_seconds(delay_us: str | None) -> float:
    delay = app.env.TANDEM_NIXL_PROGRESS_DELAY_US.name
    env = {key: value for key, value in os.environ.items() if key != delay}
    if delay_us is not None:
        env[delay] = delay_us
    done = subprocess.run(
        [sys.executable, "-c", AGENTS_IDLE_THEN_TRANSFER], capture_output=True, text=True, timeout=180, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.strip().splitlines()[-1])


def test_vllm_finds_the_plugin_through_its_entry_point() -> None:
    (plugin,) = [p for p in entry_points(group="vllm.general_plugins") if p.name == "tandem_cpu_nixl"]
    assert plugin.load() is vllm_cpu_nixl.register


def test_agents_transfer_and_idle_without_spinning_unless_told_to() -> None:
    # With the plugin's default the two agents' progress threads sleep; with the delay set
    # to 0 (NIXL's own setting) they spin: ~2 cores for 3 s. The bounds are far apart
    # (~6 s of CPU against under 0.6 s) so that a loaded machine does not blur them.
    assert _idle_cpu_seconds(None) < 0.6
    assert _idle_cpu_seconds("0") > 1.0


def test_engine_cores_are_the_ones_vllms_openmp_binding_wrote(monkeypatch) -> None:
    for name in ("OMP_PLACES", "GOMP_CPU_AFFINITY"):
        monkeypatch.delenv(name, raising=False)
    assert vllm_cpu_nixl.engine_cores() is None
    monkeypatch.setenv("OMP_PLACES", "{2,3}")  # vLLM's OMP_PROC_BIND form
    assert vllm_cpu_nixl.engine_cores() == [2, 3]
    monkeypatch.delenv("OMP_PLACES")
    monkeypatch.setenv("GOMP_CPU_AFFINITY", "0 1")  # its form with a preloaded libgomp
    assert vllm_cpu_nixl.engine_cores() == [0, 1]
    monkeypatch.setenv("GOMP_CPU_AFFINITY", "0-3")  # not a form vLLM writes: left to vLLM
    assert vllm_cpu_nixl.engine_cores() is None


# NixlConnector's worker pins its thread to the largest core of each group that
# `discover_numa_topology` returns. In a child, as vLLM loads plugins in each process.
KV_CORE_GROUPS = textwrap.dedent("""
    import json, os
    from vllm.platforms import current_platform
    for name in ("OMP_PLACES", "GOMP_CPU_AFFINITY"):
        os.environ.pop(name, None)
    vllms_own = current_platform.discover_numa_topology()
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    unbound = current_platform.discover_numa_topology()
    os.environ["OMP_PLACES"] = "{0}"
    print(json.dumps([vllms_own, unbound, current_platform.discover_numa_topology()]))
""")


def test_the_core_nixl_reserves_is_one_of_the_engines_own() -> None:
    done = subprocess.run([sys.executable, "-c", KV_CORE_GROUPS], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    vllms_own, unbound, bound = json.loads(done.stdout.strip().splitlines()[-1])
    # vLLM's own choice: the last core of each NUMA node, this machine's last core among them.
    cores = os.cpu_count()
    assert cores is not None
    assert cores - 1 in {max(group) for group in vllms_own}
    assert unbound == vllms_own  # an engine without a core binding, free to run anywhere, keeps vLLM's choice
    assert bound == [[0]]  # an engine bound to core 0 reserves core 0, not the last one


def test_an_unbound_engine_reserves_a_core_it_may_run_on() -> None:
    """A Ray worker under `taskset -c 0` (vLLM binds no OpenMP cores there) keeps to core 0."""
    argv = ["taskset", "-c", "0", sys.executable, "-c", KV_CORE_GROUPS]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    _, unbound, _ = json.loads(done.stdout.strip().splitlines()[-1])
    assert unbound == [[0]]
