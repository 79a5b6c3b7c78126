"""`versions`: one Tandem and one vLLM on every process."""

from __future__ import annotations

from app.doctor.versions import check_versions
from app.protocol import names
from tests.unit.doctor.fleets import fleet, healthy, process


def test_one_version_everywhere_passes() -> None:
    check = check_versions(healthy())
    assert check.ok and check.message == "Tandem 0.1.0 and vLLM 0.32.0 on all 6 processes"


def test_the_odd_processes_are_named_with_their_hosts() -> None:
    mixed = healthy(workers=3, routers=0)
    mixed.processes.append(process("p0", names.PREFILL_WORKER, host="10.0.0.2", vllm_version="0.31.0"))
    mixed.processes.append(process("f0", names.FRONTEND, host="10.0.0.3", tandem_version=""))
    check = check_versions(mixed)
    assert not check.ok
    assert "vLLM 0.32.0 on 4 process(es), but 0.31.0 on 10.0.0.2 (PrefillWorker p0)" in check.message
    assert "Tandem 0.1.0 on 4 process(es), but unknown (a Tandem before `tandem doctor`) on 10.0.0.3 (Frontend f0)" in (
        check.message
    )
    assert "Install one version on every node" in check.message


def test_no_process_is_not_applicable() -> None:
    check = check_versions(fleet([]))
    assert check.ok and not check.applicable
