"""`kv-events`: the routers' own word on which workers' KV events they miss."""

from __future__ import annotations

from app.doctor.kv_feed import check_kv_feed
from app.doctor.kv_layout import check_kv_layout
from app.protocol import LoadReport
from tests.unit.doctor.fleets import healthy, router_report, worker_model


def test_no_router_missing_any_worker_passes_and_says_who_was_heard() -> None:
    fleet = healthy(
        kv_heard={"w0", "w1"},
        loads=[LoadReport(worker_id="w3", running=2, waiting=0, kv_used_blocks=1, kv_total_blocks=9)],
    )
    check = check_kv_feed(fleet)
    assert check.ok and check.applicable
    assert "2 of 4 worker(s) published some in the 3s listened" in check.message
    assert "w3 ran requests without a KV event in that time" in check.message


def test_a_silent_or_rejected_worker_fails_naming_it_the_routers_and_the_fix() -> None:
    fleet = healthy()
    fleet.routers["r0"] = router_report("r0", kv_silent_workers=["w1"], kv_rejected_workers=["w2"])
    fleet.routers["r1"] = router_report("r1", kv_rejected_workers=["w2"])
    check = check_kv_feed(fleet)
    assert not check.ok
    assert "worker w1 on 10.0.0.1 runs requests, but router(s) r0 got no KV events" in check.message
    assert "is its KV event publisher up?" in check.message
    assert "router(s) r0, r1 reject the KV events of worker w2 on 10.0.0.1 (block size mismatch" in check.message


def test_without_routers_nothing_routes_by_kv_events() -> None:
    check = check_kv_feed(healthy(routers=0))
    assert check.ok and not check.applicable


def test_a_worker_rejected_for_the_block_size_it_registered_is_left_to_the_kv_layout_check() -> None:
    fleet = healthy()
    fleet.models[2] = worker_model("w2", block_size=32)
    fleet.routers["r0"] = router_report("r0", kv_rejected_workers=["w2"])
    assert check_kv_feed(fleet).ok
    assert not check_kv_layout(fleet).ok  # which names it (tests/unit/doctor/test_kv_layout.py)
