"""README.md's operator commands that need no engine, run as written: the serve plans and
live router policy, the live disaggregation thresholds, and the head node's NATS + etcd.

The tunables commands reach the session's NATS and etcd (tests/conftest.py): the test
exports NATS_SERVER and ETCD_ENDPOINTS, as README.md's other nodes do, and a namespace of
its own (TANDEM_NAMESPACE), so that no other test sees its tunables.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.infra import EtcdServer, NatsServer
from tests.capabilities import require_fabric
from tests.docs.blocks import doc_block
from tests.docs.shell import DocShell, user_environment
from tests.netns import Fabric

SERVE_PLAN = doc_block("readme-serve-plan")
DISAGG_THRESHOLDS = doc_block("readme-disagg-thresholds")
HEAD_NODE_INFRA = doc_block("readme-head-node-infra")


@pytest.fixture
def shell(nats_server: NatsServer, etcd_server: EtcdServer, tmp_path: Path) -> Iterator[DocShell]:
    env = user_environment(
        NATS_SERVER=nats_server.url, ETCD_ENDPOINTS=etcd_server.url, TANDEM_NAMESPACE=f"doc{uuid.uuid4().hex[:8]}"
    )
    with DocShell(tmp_path, env=env) as shell:
        yield shell


def test_serve_plans_config_check_and_live_router_policy(shell: DocShell) -> None:
    plan, check, router_processes_plan, policy_set, policy_reset = SERVE_PLAN.expect(
        "tandem serve", "tandem config check", "tandem serve", "tandem router set", "tandem router reset"
    )
    # A plan names a program per service the graph runs; by default the Frontend is the
    # router replica, and Router processes run once the Router section asks for replicas.
    services = {"Frontend", "Processor", "Router", "VllmWorker"}
    assert _planned_services(shell.run(plan)) & services == services - {"Router"}
    assert shell.run(check).startswith("OK: ")
    assert _planned_services(shell.run(router_processes_plan)) & services == services

    policy = policy_set.words[policy_set.words.index("--policy") + 1]
    shell.run(policy_set)
    assert policy in shell.check(".venv/bin/tandem router show")
    shell.run(policy_reset)
    assert policy not in shell.check(".venv/bin/tandem router show")


def _planned_services(plan: str) -> set[str]:
    """The first words of `tandem serve --dry-run`'s lines: a program's line starts with its service."""
    return {line.split()[0] for line in plan.splitlines() if line.strip()}


def test_disagg_thresholds_change_and_reset(shell: DocShell) -> None:
    show, change, reset = DISAGG_THRESHOLDS.expect("tandem disagg show", "tandem disagg set", "tandem disagg reset")
    words = change.words
    values = [words[words.index(flag) + 1] for flag in ("--max-local-prefill-length", "--max-prefill-queue-size")]

    def shows_values(shown: str) -> list[bool]:
        return [re.search(rf"\b{value}\b", shown) is not None for value in values]

    assert shows_values(shell.run(show)) == [False, False]
    shell.run(change)
    assert shows_values(shell.check(".venv/bin/tandem disagg show")) == [True, True]
    shell.run(reset)
    assert shows_values(shell.check(".venv/bin/tandem disagg show")) == [False, False]


def test_head_node_infra_binds_the_address_it_is_given(tmp_path: Path) -> None:
    """`<head-node-ip>` is a network namespace's address: the block binds NATS and etcd's
    default ports there without meeting anything of this machine's. TANDEM_STATE_DIR keeps
    `infra`'s record of what it started in the test's directory, not the repository's .state."""
    require_fabric()
    up, status, down = HEAD_NODE_INFRA.expect("tandem infra up", "tandem infra status", "tandem infra down")
    with Fabric(1) as fabric:
        (head,) = fabric.nodes
        env = user_environment(TANDEM_STATE_DIR=str(tmp_path / "state"))
        shell = DocShell(tmp_path / "shell", env=env, placeholders={"head-node-ip": head.ip}, node=head)
        try:
            printed = shell.run(up)
            assert printed.split() == [f"NATS_SERVER=nats://{head.ip}:4222", f"ETCD_ENDPOINTS=http://{head.ip}:2379"]
            assert f"url=nats://{head.ip}:4222" in shell.run(status)
            assert "etcd" in shell.run(down)
        finally:
            shell.check(".venv/bin/tandem infra down")  # whatever `up` started, even if a step failed
        # Nothing is left running: `status` now says so and fails.
        assert head.run(["bash", "-c", ".venv/bin/tandem infra status"], env=env, cwd=shell.cwd).returncode != 0
