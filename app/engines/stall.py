"""`StallWatch`: whether an engine is hung, from the looks its host takes at its progress.

An engine that died says so (`Engine.dead_reason`). One that hangs says nothing: its core
process SIGSTOPped, a CUDA call that never returns, a deadlock. Requests routed to it wait
for ever, and KV routing keeps sending it more, since its cached blocks stay in the index.

Hung means: the engine has requests to serve and completes no step for
`engine-stall-timeout-s` of such time. Steps, not tokens: a long prompt's chunked prefill
makes no token for several steps, yet every step ends (vLLM reports each to its stat
loggers; the mocker counts its own). A healthy engine with work completes a step every
few milliseconds to a second or two (a 2-core CPU running the tiny model: milliseconds; a
large model's prefill chunk on a GPU: under a second), so the default of 60 s never fires
on one that is only slow. Time without requests neither counts nor forgives: the clock
stops while the engine is idle and restarts only at its next step, so that a hung engine
whose requests each time out (a PrefillWorker's jobs are abandoned after
`remote-prefill-timeout-s`) before the timeout still adds up to it.

An idle engine is not probed: a hang harms nobody until a request comes, and then this
watch sees it.
"""

from __future__ import annotations

from app.engines.base import EngineProgress

# A look that comes later than this after the one before (this process's event loop was
# blocked) counts for this much: the engine's outputs may be queued behind that block, not
# missing. A stall is then seen later than its timeout, never sooner.
MAX_LOOK_INTERVAL_S = 1.0


class StallWatch:
    """Feed it a look at the engine every check interval (`look`); it answers how long the
    engine has stalled once that reaches `timeout_s`."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._last: EngineProgress | None = None
        self._last_at = 0.0
        self._stalled_s = 0.0

    def look(self, progress: EngineProgress, now: float) -> float | None:
        """`now`: a monotonic clock. None while the engine gets on; else the seconds it has
        had requests to serve and made no step (at least `timeout_s`)."""
        last, last_at = self._last, self._last_at
        self._last, self._last_at = progress, now
        if last is None:
            return None
        if progress.steps != last.steps:
            self._stalled_s = 0.0
        elif last.pending and progress.pending:
            # Only time with requests at both looks counts: a request that came just
            # before this look has not waited the whole interval.
            self._stalled_s += min(now - last_at, MAX_LOOK_INTERVAL_S)
        return self._stalled_s if self._stalled_s >= self.timeout_s else None
