"""`kv-layout`: workers key their KV blocks as the routers that route to them."""

from __future__ import annotations

from app.doctor.kv_layout import check_kv_layout
from app.protocol import names
from tests.unit.doctor.fleets import fleet, healthy, process, router_report, worker_model


def test_a_fleet_whose_workers_and_routers_agree_passes() -> None:
    check = check_kv_layout(healthy())
    assert check.ok and check.applicable, check
    assert "4 worker(s) and 2 router replica(s) agree: block size 16" in check.message


def test_a_worker_with_another_block_size_fails_naming_it_and_the_fix() -> None:
    bad = healthy()
    bad.models[2] = worker_model("w2", block_size=32)
    check = check_kv_layout(bad)
    assert not check.ok
    assert "worker w2 on 10.0.0.1 has block size 32, routers r0, r1 use 16" in check.message
    assert "start it with the routers' block-size" in check.message
    for fine in ("w0", "w1", "w3"):
        assert f"worker {fine} " not in check.message


def test_a_worker_with_another_hash_scheme_or_none_fails() -> None:
    bad = healthy()
    bad.models[0] = worker_model("w0", kv_hash_scheme="engine-sha256")
    bad.models[1] = worker_model("w1", kv_hash_scheme="")  # an older Tandem says none
    check = check_kv_layout(bad)
    assert not check.ok
    assert "worker w0 on 10.0.0.1 has KV hash scheme engine-sha256" in check.message
    assert "worker w1 on 10.0.0.1 has KV hash scheme unknown (an older Tandem)" in check.message


def test_a_router_configured_for_a_model_no_worker_serves_fails() -> None:
    bad = healthy(workers=1, routers=1)
    bad.models[0] = worker_model("w0", model="other")
    check = check_kv_layout(bad)
    assert not check.ok
    assert "router r0 on 10.0.0.1 is configured for model 'tiny-llama', which no VllmWorker serves" in check.message
    assert "(they serve 'other')" in check.message


def test_a_router_configured_with_the_model_path_or_no_model_takes_its_workers() -> None:
    by_path = healthy(workers=1, routers=2)
    by_path.models[0] = worker_model("w0", model_path="/models/tiny-llama")
    by_path.routers["r0"] = router_report("r0", model="/models/tiny-llama")
    by_path.routers["r1"] = router_report("r1", model="")
    assert check_kv_layout(by_path).ok


def test_workers_of_two_models_pass_while_they_share_the_routers_block_size() -> None:
    two = fleet(
        [process("w0", names.VLLM_WORKER), process("w1", names.VLLM_WORKER), process("r0", names.ROUTER)],
        [worker_model("w0"), worker_model("w1", model="other")],
        [router_report("r0")],
    )
    assert check_kv_layout(two).ok
    # Every replica indexes every worker's KV events with one block size.
    two.models[1] = worker_model("w1", model="other", block_size=64)
    check = check_kv_layout(two)
    assert not check.ok and "worker w1 on 10.0.0.1 has block size 64, router r0 uses 16" in check.message


def test_a_router_that_does_not_report_or_does_not_say_its_layout_fails() -> None:
    silent = healthy(routers=2)
    del silent.routers["r1"]
    check = check_kv_layout(silent)
    assert not check.ok and "router r1 on 10.0.0.1 sent no RouterReport within 3s" in check.message

    older = healthy(workers=1, routers=1)
    older.routers["r0"] = router_report("r0", block_size=0, hash_scheme="")
    check = check_kv_layout(older)
    assert not check.ok and "router r0 on 10.0.0.1 does not say its block size and hash scheme" in check.message


def test_reports_of_routers_gone_since_are_ignored_and_no_routers_is_not_applicable() -> None:
    gone = healthy(routers=0)
    gone.routers["r9"] = router_report("r9", block_size=64)  # heard, but its process record went
    check = check_kv_layout(gone)
    assert check.ok and not check.applicable and "no router replica" in check.message
