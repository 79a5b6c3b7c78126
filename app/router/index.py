"""Which worker holds which prompt blocks: the router's view of every worker's prefix cache.

Fed by the `KvEventBatch`es workers publish; answers "how many leading blocks of this
prompt does each worker already hold" in one walk over the prompt's blocks.

Keys are the router's own chained hashes (`app.router.hashing`), so the same prefix
has the same key on every worker. Each worker's engine hashes are kept only to
translate later removals and to chain a `BlockStored` to its parent block.

Data layout, chosen for the query: `router hash -> bitmask of worker slots`. A query
ANDs the masks of consecutive prompt blocks; a worker drops out of the mask at the
first block it lacks, which is its overlap. The walk stops as soon as the mask is empty.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence

from app.logs import Throttled
from app.protocol import AllBlocksCleared, BlockRemoved, BlockStored, EngineBlockHash, KvEvent, KvEventBatch
from app.router.hashing import block_hashes

log = logging.getLogger(__name__)
# A NATS blip makes a gap in every worker's KV events; a broken publisher sends bad events
# by the batch: one line per kind, each counted (seq_gaps, malformed_events) in the metrics.
_seq_gap_log = Throttled(log)
_malformed_log = Throttled(log)
_hash_reused_log = Throttled(log)


class BlockSizeMismatchError(ValueError):
    """A worker's KV events use a block size other than the index's."""

    def __init__(self, worker_id: str, got: int, expected: int) -> None:
        super().__init__(
            f"KV event batch from worker {worker_id!r} has block_size {got}, "
            f"but the router indexes blocks of {expected} tokens; rejected"
        )
        self.worker_id = worker_id
        self.got = got
        self.expected = expected


class _WorkerBlocks:
    """One worker's blocks, as its engine names them and as the router does."""

    __slots__ = ("slot", "bit", "last_seq", "router_hash_of", "engine_copies", "router_copies")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.bit = 1 << slot
        self.last_seq: int | None = None
        self.router_hash_of: dict[EngineBlockHash, int] = {}
        # vLLM may cache the same block twice (two requests filled it in the same step)
        # and then reports each copy's store and removal: extra copies are counted here
        # (absent = one copy) so the block stays held until its last copy goes.
        self.engine_copies: dict[EngineBlockHash, int] = {}
        # Two engine hashes can name the same tokens (e.g. different LoRA or salt).
        self.router_copies: dict[int, int] = {}


class KvIndex:
    """The prefix-cache contents of every worker, keyed by router block hashes."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self._holders: dict[int, int] = {}  # router hash -> bitmask of worker slots
        self._workers: dict[str, _WorkerBlocks] = {}
        self._worker_of_slot: list[str | None] = []
        self._free_slots: list[int] = []  # a heap: reuse low slots to keep masks short
        self.seq_gaps = 0
        self.stale_batches = 0  # skipped: their seq was applied already
        self.orphan_blocks = 0  # stored blocks skipped: their parent block was unknown
        self.malformed_events = 0

    # --- ingestion --------------------------------------------------------------

    def apply_batch(self, batch: KvEventBatch) -> None:
        """Apply one worker's events. Raises BlockSizeMismatchError (nothing applied)."""
        if batch.block_size != self.block_size:
            raise BlockSizeMismatchError(batch.worker_id, batch.block_size, self.block_size)
        worker = self._workers.get(batch.worker_id) or self._add_worker(batch.worker_id)
        # A message carries the worker's batches seq_from..seq (several, where it sent a
        # few milliseconds' batches as one), and follows last_seq where it starts at last_seq + 1.
        if worker.last_seq is not None and batch.seq <= worker.last_seq:
            # Already applied, or accounted for by a dump of the worker's cache (`replace_worker`).
            self.stale_batches += 1
            return
        if worker.last_seq is not None and batch.seq_from != worker.last_seq + 1:
            # Events were lost: the view of this worker is stale until a dump of its cache
            # replaces it (app/router/kv_resync.py), but later events are still worth applying.
            # (A message that overlaps what was applied, which its worker never sends, counts
            # as a gap too: its events cannot be split, and some would apply twice.)
            self.seq_gaps += 1
            _seq_gap_log.log(
                "KV events from worker %s: expected seq %d, got %d",
                batch.worker_id,
                worker.last_seq + 1,
                batch.seq_from,
            )
        worker.last_seq = batch.seq
        self._apply_events(batch.worker_id, worker, batch.events)

    def replace_worker(self, worker_id: str, dump: Sequence[KvEventBatch]) -> None:
        """Make a worker's blocks what a dump of its cache says (app/engines/kv_mirror.py): a
        clear, then every block it holds, as of its batch `dump[0].seq`, which later batches
        follow. Raises BlockSizeMismatchError (nothing applied)."""
        for batch in dump:
            if batch.block_size != self.block_size:
                raise BlockSizeMismatchError(worker_id, batch.block_size, self.block_size)
        worker = self._workers.get(worker_id) or self._add_worker(worker_id)
        self._clear(worker)
        worker.last_seq = dump[0].seq if dump else None
        for batch in dump:
            self._apply_events(worker_id, worker, batch.events)

    def _apply_events(self, worker_id: str, worker: _WorkerBlocks, events: Sequence[KvEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                self._store(worker_id, worker, event)
            elif isinstance(event, BlockRemoved):
                self._remove(worker, event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self._clear(worker)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker and everything it held (it left the fleet)."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return
        self._clear(worker)
        self._worker_of_slot[worker.slot] = None
        heapq.heappush(self._free_slots, worker.slot)

    def _add_worker(self, worker_id: str) -> _WorkerBlocks:
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
            self._worker_of_slot[slot] = worker_id
        else:
            slot = len(self._worker_of_slot)
            self._worker_of_slot.append(worker_id)
        worker = _WorkerBlocks(slot)
        self._workers[worker_id] = worker
        return worker

    def _store(self, worker_id: str, worker: _WorkerBlocks, event: BlockStored) -> None:
        engine_hashes = event.block_hashes
        if len(event.token_ids) != len(engine_hashes) * self.block_size:
            self.malformed_events += 1
            _malformed_log.log(
                "KV events from worker %s: BlockStored with %d blocks but %d tokens; skipped",
                worker_id,
                len(engine_hashes),
                len(event.token_ids),
            )
            return
        router_hash_of = worker.router_hash_of
        parent: int | None = None
        if event.parent_block_hash is not None:
            parent = router_hash_of.get(event.parent_block_hash)
            if parent is None:
                # Chained from a block we never saw (lost event, or evicted before we
                # caught up): no prompt can match these blocks from its start.
                self.orphan_blocks += len(engine_hashes)
                log.debug("KV events from worker %s: %d blocks with unknown parent", worker_id, len(engine_hashes))
                return
        holders = self._holders
        bit = worker.bit
        for engine_hash, router_hash in zip(
            engine_hashes, block_hashes(event.token_ids, self.block_size, parent), strict=True
        ):
            known = router_hash_of.get(engine_hash)
            if known is not None:
                if known == router_hash:
                    worker.engine_copies[engine_hash] = worker.engine_copies.get(engine_hash, 1) + 1
                else:
                    self.malformed_events += 1
                    _hash_reused_log.log(
                        "KV events from worker %s: engine hash %r reused for other tokens", worker_id, engine_hash
                    )
                continue
            router_hash_of[engine_hash] = router_hash
            mask = holders.get(router_hash, 0)
            if mask & bit:
                worker.router_copies[router_hash] = worker.router_copies.get(router_hash, 1) + 1
            else:
                holders[router_hash] = mask | bit

    def _remove(self, worker: _WorkerBlocks, engine_hashes: Sequence[EngineBlockHash]) -> None:
        holders = self._holders
        router_hash_of = worker.router_hash_of
        for engine_hash in engine_hashes:
            router_hash = router_hash_of.get(engine_hash)
            if router_hash is None:
                continue  # an orphan we skipped, or already gone
            if _drop_copy(worker.engine_copies, engine_hash):
                continue
            del router_hash_of[engine_hash]
            if _drop_copy(worker.router_copies, router_hash):
                continue
            mask = holders[router_hash] & ~worker.bit
            if mask:
                holders[router_hash] = mask
            else:
                del holders[router_hash]

    def _clear(self, worker: _WorkerBlocks) -> None:
        holders = self._holders
        keep = ~worker.bit
        for router_hash in set(worker.router_hash_of.values()):
            mask = holders[router_hash] & keep
            if mask:
                holders[router_hash] = mask
            else:
                del holders[router_hash]
        worker.router_hash_of.clear()
        worker.engine_copies.clear()
        worker.router_copies.clear()

    # --- queries ----------------------------------------------------------------

    def find_matches(self, hashes: Sequence[int]) -> dict[str, int]:
        """Overlap of each worker with a prompt given as router block hashes.

        The overlap is the number of leading blocks the worker holds; workers with
        none are absent from the result.
        """
        if not hashes:
            return {}
        holders = self._holders
        active = holders.get(hashes[0], 0)
        if not active:
            return {}
        worker_of_slot = self._worker_of_slot
        overlaps: dict[str, int] = {}
        for position in range(1, len(hashes)):
            still = active & holders.get(hashes[position], 0)
            if still != active:
                _assign(overlaps, worker_of_slot, active ^ still, position)
                if not still:
                    return overlaps
                active = still
        _assign(overlaps, worker_of_slot, active, len(hashes))
        return overlaps

    def find_matches_for_tokens(self, token_ids: Sequence[int]) -> dict[str, int]:
        """`find_matches` for a prompt given as token ids (only full blocks count)."""
        return self.find_matches(block_hashes(token_ids, self.block_size))

    # --- introspection ----------------------------------------------------------

    def workers(self) -> list[str]:
        return list(self._workers)

    def num_blocks(self) -> int:
        """Distinct blocks held by at least one worker."""
        return len(self._holders)

    def worker_blocks(self, worker_id: str) -> int:
        """Blocks a worker holds, counted by engine hash."""
        worker = self._workers.get(worker_id)
        return 0 if worker is None else len(worker.router_hash_of)


def _drop_copy(copies: dict, key: object) -> bool:
    """Forget one extra copy of `key`; False when it had none (the last copy goes)."""
    count = copies.get(key)
    if count is None:
        return False
    if count == 2:
        del copies[key]
    else:
        copies[key] = count - 1
    return True


def _assign(overlaps: dict[str, int], worker_of_slot: list[str | None], mask: int, overlap: int) -> None:
    while mask:
        lowest = mask & -mask
        worker_id = worker_of_slot[lowest.bit_length() - 1]
        if worker_id is not None:
            overlaps[worker_id] = overlap
        mask ^= lowest
