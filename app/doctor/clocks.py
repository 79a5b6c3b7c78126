"""Check `clocks`: the nodes' wall clocks agree to within the prefill-job deadline's margin.

A prefill job carries its deadline as the decode node's wall clock (app/protocol/prefill.py):
today's PrefillWorkers ask the decode worker how long it still waits instead, but older
ones and every log line read the deadline against their own clock, and a node whose
clock is off by more than a small part of `remote-prefill-timeout-s` skips jobs that were
still wanted, or logs them out of order. A tenth of the timeout is the margin: NTP keeps
clocks within milliseconds, so anything near it means a node's time sync is off.

How the offsets are measured, from the doctor's node:
- a VllmWorker's or router replica's reports carry its wall clock at sending: the report's
  timestamp minus the doctor's clock at receipt is the offset less the one-way delay; the
  largest of a process's readings is taken (the one delayed least), and
  `REPORT_DELAY_BOUND_S` is its error.
- a PrefillWorker (it publishes no reports) answers its `status` call with its clock: the
  offset is that minus the middle of the call, within half the round trip.
A node's offset is that of its best reading (the smallest error); the spread between the
nodes' offsets is what must stay under the margin.
"""

from __future__ import annotations

from app.doctor.check import Check, ClockSample, Fleet, failed, not_applicable, passed

NAME = "clocks"
# The margin, as a part of the decode workers' remote-prefill-timeout-s.
MARGIN_OF_TIMEOUT = 0.1
# A report's trip through NATS, from its timestamp to the doctor's callback: well under a
# millisecond on a LAN, tens of them where the sender's event loop is busy; the bound taken
# as a report reading's error (the delay is not measured, a reading only ever lags).
REPORT_DELAY_BOUND_S = 0.05


def clock_margin_s(remote_prefill_timeout_s: float) -> float:
    return MARGIN_OF_TIMEOUT * remote_prefill_timeout_s


def node_offsets(fleet: Fleet) -> dict[str, ClockSample]:
    """Each node's best reading (by host), from its processes' samples."""
    best: dict[str, ClockSample] = {}
    for sample in fleet.clocks:
        process = fleet.process(sample.instance_id)
        if process is None:
            continue
        current = best.get(process.host)
        if current is None or sample.error_s < current.error_s:
            best[process.host] = sample
    return best


def check_clocks(fleet: Fleet, margin_s: float) -> Check:
    offsets = node_offsets(fleet)
    hosts = sorted({p.host for p in fleet.processes})
    unmeasured = [h for h in hosts if h not in offsets]
    unmeasured_note = (
        f"; not measured on {', '.join(unmeasured)} (runs nothing that publishes its clock: only "
        "VllmWorkers, routers and PrefillWorkers do, and only their clocks meet deadlines)"
        if unmeasured
        else ""
    )
    if len(offsets) < 2:
        return not_applicable(NAME, f"clocks of {len(offsets)} node(s) measured, nothing to compare{unmeasured_note}")
    ahead = max(offsets, key=lambda h: offsets[h].offset_s)
    behind = min(offsets, key=lambda h: offsets[h].offset_s)
    spread = offsets[ahead].offset_s - offsets[behind].offset_s
    error = offsets[ahead].error_s + offsets[behind].error_s
    shown = ", ".join(f"{h} {_signed(offsets[h].offset_s)}" for h in sorted(offsets))
    if spread > margin_s:
        return failed(
            NAME,
            [
                f"the clock of {ahead} is {spread:.3f}s (±{error:.3f}s) ahead of {behind}'s, more than the "
                f"{margin_s:g}s margin of the prefill-job deadline (offsets from the doctor's clock: {shown})"
            ],
            "Sync every node's clock (chrony or systemd-timesyncd against one NTP server)",
        )
    return passed(
        NAME,
        f"{len(offsets)} nodes within {spread:.3f}s (±{error:.3f}s) of each other, under the {margin_s:g}s margin "
        f"(offsets from the doctor's clock: {shown}){unmeasured_note}",
    )


def _signed(seconds: float) -> str:
    return f"{seconds:+.3f}s"
