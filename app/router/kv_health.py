"""`KvFeedHealth`: which workers' KV events a router replica cannot route by, said loudly.

KV-aware routing degrades silently when a worker's KV events stop arriving (its publisher
broke, a subject mismatch) or arrive unusable (another block size): the index then holds
nothing of that worker and the policy routes as if it cached nothing. Two cases are told
apart, each logged as one WARNING per worker (and again only after it recovered), counted,
and listed in the replica's `RouterReport` (`tandem status` shows them):

- silent: the worker's load reports say it has been running requests without a break for
  longer than `silence_s`, and no KV event batch of it arrived in that time. A busy engine
  stores blocks as it prefills and decodes, so its batches keep coming.
- rejected: its batches do not fit the index (block size mismatch); it stays listed until
  a batch of it is accepted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class KvFeedHealth:
    def __init__(self, silence_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._silence_s = silence_s
        self._clock = clock
        self._last_batch: dict[str, float] = {}
        self._busy_since: dict[str, float] = {}
        self.silent: set[str] = set()
        self.rejected: set[str] = set()
        self.silences = 0  # workers found silent, each time counted once

    def on_batch(self, worker_id: str, rejected_because: str | None = None) -> None:
        """A KV event batch of the worker arrived; `rejected_because`: why the index refused it."""
        self._last_batch[worker_id] = self._clock()
        if worker_id in self.silent:
            self.silent.discard(worker_id)
            log.info("KV events from worker %s arrive again", worker_id)
        if rejected_because is None:
            if worker_id in self.rejected:
                self.rejected.discard(worker_id)
                log.info("KV events from worker %s accepted again", worker_id)
            return
        if worker_id not in self.rejected:
            self.rejected.add(worker_id)
            log.warning("%s; KV-aware routing cannot see what worker %s caches", rejected_because, worker_id)

    def on_load(self, worker_id: str, running: int) -> None:
        """The worker's load report: `running` requests in its engine now."""
        now = self._clock()
        if running <= 0:
            self._busy_since.pop(worker_id, None)
            return
        busy_since = self._busy_since.setdefault(worker_id, now)
        quiet_since = max(busy_since, self._last_batch.get(worker_id, busy_since))
        if now - quiet_since > self._silence_s and worker_id not in self.silent:
            self.silent.add(worker_id)
            self.silences += 1
            log.warning(
                "worker %s has served requests for %.0fs without publishing KV events; "
                "KV-aware routing cannot see what it caches (is its KV event publisher up?)",
                worker_id,
                now - quiet_since,
            )

    def remove_worker(self, worker_id: str) -> None:
        self._last_batch.pop(worker_id, None)
        self._busy_since.pop(worker_id, None)
        self.silent.discard(worker_id)
        self.rejected.discard(worker_id)
