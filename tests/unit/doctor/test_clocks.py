"""`clocks`: the spread of the nodes' clock offsets against the prefill-job deadline's margin."""

from __future__ import annotations

from app.doctor.check import ClockSample
from app.doctor.clocks import check_clocks, clock_margin_s, node_offsets
from app.protocol import names
from tests.unit.doctor.fleets import fleet, process


def three_nodes(*samples: ClockSample) -> object:
    return fleet(
        [
            process("w0", names.VLLM_WORKER, host="10.0.0.1"),
            process("r0", names.ROUTER, host="10.0.0.1"),
            process("p0", names.PREFILL_WORKER, host="10.0.0.2"),
            process("f0", names.FRONTEND, host="10.0.0.3"),
        ],
        clocks=list(samples),
    )


def test_the_margin_is_a_tenth_of_the_remote_prefill_timeout() -> None:
    assert clock_margin_s(30.0) == 3.0


def test_each_node_takes_its_best_reading() -> None:
    fleet = three_nodes(ClockSample("w0", 0.2, 0.05), ClockSample("r0", 0.01, 0.001), ClockSample("p0", 1.0, 0.002))
    best = node_offsets(fleet)  # type: ignore[arg-type]
    assert best["10.0.0.1"].instance_id == "r0" and best["10.0.0.2"].offset_s == 1.0
    assert "10.0.0.3" not in best  # a Frontend publishes no clock


def test_nodes_within_the_margin_pass_and_the_unmeasured_are_named() -> None:
    fleet = three_nodes(ClockSample("w0", 0.010, 0.05), ClockSample("p0", -0.020, 0.002))
    check = check_clocks(fleet, 3.0)  # type: ignore[arg-type]
    assert check.ok and check.applicable
    assert "2 nodes within 0.030s (±0.052s) of each other, under the 3s margin" in check.message
    assert "not measured on 10.0.0.3" in check.message


def test_a_node_off_by_more_than_the_margin_fails_naming_both_ends() -> None:
    fleet = three_nodes(ClockSample("w0", 0.0, 0.05), ClockSample("p0", 4.5, 0.002))
    check = check_clocks(fleet, 3.0)  # type: ignore[arg-type]
    assert not check.ok
    assert "the clock of 10.0.0.2 is 4.500s (±0.052s) ahead of 10.0.0.1's, more than the 3s margin" in check.message
    assert "chrony" in check.message


def test_one_measured_node_has_nothing_to_compare() -> None:
    check = check_clocks(three_nodes(ClockSample("w0", 9.0, 0.05)), 3.0)  # type: ignore[arg-type]
    assert check.ok and not check.applicable
