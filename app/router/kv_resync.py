"""`KvResync`: a router replica's view of a worker's cache, made whole again from the worker.

The index (app/router/index.py) knows what a worker's KV events told it since the replica
started. A replica that started after the worker, lost a batch (a gap in the worker's seq)
or dropped the worker when its lease blipped would miss the blocks cached before: a prefix
chained to a block the index never saw is dropped as an orphan, so a prompt cached before
stays invisible until evicted. So the replica asks the worker for its whole cache (the
worker's `kv_blocks` endpoint answers from app/engines/kv_mirror.py) on its own start, on a
gap, and when the worker registers (again), and replaces the worker's blocks with it.

The dump is as of one seq S of the worker's batches. The worker's batches that arrive while
it is on the way are held, and applied after it: those up to S are in the dump already (the
index skips them), those after S follow it. A message that carries several of the
worker's batches (first_seq..seq) is either all up to S or all after it: the worker sends
the batches it holds before it takes the dump (app/engines/host.py). Nothing here runs per
request; a batch of a worker not being re-synced costs one dict lookup more.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Literal

from app.aio import cancel_and_wait
from app.protocol import KvEventBatch
from app.router.core import RoutingCore

log = logging.getLogger(__name__)

FetchBlocks = Callable[[str], Awaitable[list[KvEventBatch]]]

# Why a worker is re-synced: the label of the router's re-sync counters, and in its logs.
Reason = Literal["start", "seq_gap", "registered"]
_WHY: dict[Reason, str] = {
    "start": "this router started",
    "seq_gap": "a gap in its KV events",
    "registered": "it registered",
}

# Dumps fetched at once: a replica that starts beside a thousand workers asks a few at a time.
_CONCURRENT_FETCHES = 8
# A worker that cannot answer (it is still registering its endpoints, or an older build
# without `kv_blocks`) is asked again after 0.2 s, 0.4 s, ... for about this long in all.
_FIRST_RETRY_S = 0.2
_MAX_RETRY_S = 5.0
_GIVE_UP_AFTER_S = 30.0


class KvResync:
    def __init__(self, core: RoutingCore, fetch_blocks: FetchBlocks) -> None:
        """`fetch_blocks(worker_id)`: the worker's dump of its cache (the feed's `kv_blocks`)."""
        self._core = core
        self._fetch_blocks = fetch_blocks
        self._held: dict[str, list[KvEventBatch]] = {}  # a worker's batches while its dump is on the way
        self._fetches: dict[str, asyncio.Task[None]] = {}
        self._known: set[str] = set()  # re-synced (or being re-synced) since it last registered
        self._slots = asyncio.Semaphore(_CONCURRENT_FETCHES)
        self._first_tries: set[asyncio.Future[None]] = set()  # done once a fetch was tried once
        # By reason (the router's metrics and its RouterReport): dumps applied, and workers
        # given up on (they never answered; routing sees only their events meanwhile).
        self.resyncs: Counter[Reason] = Counter()
        self.failures: Counter[Reason] = Counter()

    def on_batch(self, batch: KvEventBatch) -> None:
        """A worker's KV event batch, as it arrives."""
        held = self._held.get(batch.worker_id)
        if held is not None:
            held.append(batch)
            return
        core = self._core
        gaps = core.seq_gaps
        core.apply_kv_batch(batch)
        if core.seq_gaps != gaps:
            self.resync(batch.worker_id, "seq_gap")

    def on_worker_up(self, worker_id: str) -> None:
        """The worker's record is there: re-sync one that registered since the replica last
        knew it (new, or back after its lease went)."""
        if worker_id not in self._known:
            self.resync(worker_id, "registered")

    def on_worker_gone(self, worker_id: str) -> None:
        self._known.discard(worker_id)
        self._held.pop(worker_id, None)
        fetch = self._fetches.pop(worker_id, None)
        if fetch is not None:
            fetch.cancel()

    def resync(self, worker_id: str, reason: Reason) -> None:
        """Replace the replica's view of the worker with its dump, once it comes; a re-sync
        on the way already answers for now."""
        self._known.add(worker_id)
        if worker_id in self._fetches:
            return
        self._held[worker_id] = []
        loop = asyncio.get_running_loop()
        tried = loop.create_future()
        self._first_tries.add(tried)
        tried.add_done_callback(self._first_tries.discard)
        fetch = self._fetch(worker_id, reason, tried)
        self._fetches[worker_id] = loop.create_task(fetch, name=f"kv-resync-{worker_id}")

    async def settled(self, timeout: float) -> None:
        """Until each re-sync on the way now has been answered or failed once (or `timeout`
        seconds passed): a worker that cannot answer yet is asked again later, unwaited."""
        if self._first_tries:
            await asyncio.wait(list(self._first_tries), timeout=timeout)

    async def close(self) -> None:
        fetches, self._fetches = list(self._fetches.values()), {}
        for fetch in fetches:
            await cancel_and_wait(fetch)

    async def _fetch(self, worker_id: str, reason: Reason, tried: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + _GIVE_UP_AFTER_S
        delay = _FIRST_RETRY_S
        try:
            while True:
                self._held.setdefault(worker_id, [])
                try:
                    async with self._slots:
                        dump = await self._fetch_blocks(worker_id)
                except Exception as exc:
                    # Meanwhile the worker's batches apply as they come, as without a re-sync.
                    self._release(worker_id)
                    if loop.time() + delay > give_up_at:
                        del self._fetches[worker_id]
                        self.failures[reason] += 1
                        log.warning(
                            "worker %s did not send its cached KV blocks (%s; re-sync for %s): "
                            "routing sees only what its KV events say from now on",
                            worker_id,
                            exc,
                            _WHY[reason],
                        )
                        return
                    log.debug("worker %s: cached KV blocks not fetched yet (%s)", worker_id, exc)
                else:
                    del self._fetches[worker_id]
                    self._apply(worker_id, reason, dump)
                    return
                finally:
                    if not tried.done():
                        tried.set_result(None)
                await asyncio.sleep(delay)
                delay = min(2 * delay, _MAX_RETRY_S)
        finally:
            if not tried.done():
                tried.cancel()

    def _apply(self, worker_id: str, reason: Reason, dump: list[KvEventBatch]) -> None:
        if self._core.apply_kv_dump(worker_id, dump):
            self.resyncs[reason] += 1
            log.info(
                "KV index of worker %s re-synced (%s): %d blocks, as of its KV batch %d",
                worker_id,
                _WHY[reason],
                self._core.index.worker_blocks(worker_id),
                dump[0].seq,
            )
        self._release(worker_id)

    def _release(self, worker_id: str) -> None:
        """Apply the batches held for the worker: those the dump accounts for are skipped."""
        for batch in sorted(self._held.pop(worker_id, ()), key=lambda batch: batch.seq):
            self.on_batch(batch)
