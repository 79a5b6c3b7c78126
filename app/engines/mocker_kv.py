"""The mocker's paged KV cache: a block pool with prefix caching and vLLM's KV events.

Mirrors vLLM v1's `BlockPool`: a block that fills up is cached under the chained hash
of its tokens (`BlockStored`); a freed block stays cached and is reused by a later
request with the same prefix until the pool needs it for new data, when it is
evicted least-recently-freed first (`BlockRemoved`). Freed blocks that were never
cached are handed out before cached ones, as vLLM does, so the cache lives longer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from app.protocol import BlockRemoved, BlockStored, KvEvent


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref_count = [0] * num_blocks
        self._hash_of_block: list[int | None] = [None] * num_blocks
        self._block_of_hash: dict[int, int] = {}
        self._free_uncached: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._events: list[KvEvent] = []

    def num_free(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    def num_used(self) -> int:
        return self.num_blocks - self.num_free()

    def take_events(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events

    def match_prefix(self, hashes: Sequence[int]) -> list[int]:
        """The cached blocks holding the longest prefix of `hashes` (not yet touched)."""
        if not self.enable_caching:
            return []
        blocks = []
        for block_hash in hashes:
            block = self._block_of_hash.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks a request reuses."""
        for block in blocks:
            if self._ref_count[block] == 0:
                del self._free_cached[block]
            self._ref_count[block] += 1

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks, evicting cached ones if needed; None if too few are free."""
        if count > self.num_free():
            return None
        blocks = []
        for _ in range(count):
            if self._free_uncached:
                block = self._free_uncached.pop()
            else:
                block, _ = self._free_cached.popitem(last=False)
                self._evict(block)
            self._ref_count[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop a request's references. Its tail blocks go first in eviction order:
        they are the least likely to be shared by another prompt."""
        for block in reversed(blocks):
            self._ref_count[block] -= 1
            if self._ref_count[block] == 0:
                if self._hash_of_block[block] is None:
                    self._free_uncached.append(block)
                else:
                    self._free_cached[block] = None

    def cache_full_blocks(
        self, blocks: Sequence[int], hashes: Sequence[int], parent_hash: int | None, token_ids: Sequence[int]
    ) -> None:
        """Register blocks that just filled up; `token_ids` covers all of them."""
        if not self.enable_caching:
            return
        block_size = len(token_ids) // len(blocks)
        run_start: int | None = None
        for i, (block, block_hash) in enumerate(zip(blocks, hashes, strict=True)):
            if block_hash in self._block_of_hash:
                # Another request filled the same block first; keep one copy cached,
                # this one goes back to the pool uncached when its request ends.
                if run_start is not None:
                    self._stored(hashes, token_ids, block_size, run_start, i, parent_hash)
                    run_start = None
                continue
            self._hash_of_block[block] = block_hash
            self._block_of_hash[block_hash] = block
            if run_start is None:
                run_start = i
        if run_start is not None:
            self._stored(hashes, token_ids, block_size, run_start, len(blocks), parent_hash)

    def _stored(
        self,
        hashes: Sequence[int],
        token_ids: Sequence[int],
        block_size: int,
        start: int,
        end: int,
        parent_hash: int | None,
    ) -> None:
        self._events.append(
            BlockStored(
                token_ids=list(token_ids[start * block_size : end * block_size]),
                block_hashes=list(hashes[start:end]),
                parent_block_hash=parent_hash if start == 0 else hashes[start - 1],
            )
        )

    def _evict(self, block: int) -> None:
        block_hash = self._forget_hash(block)
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockRemoved):
            last.block_hashes.append(block_hash)  # one event per eviction burst
        else:
            self._events.append(BlockRemoved(block_hashes=[block_hash]))

    def _forget_hash(self, block: int) -> int:
        block_hash = self._hash_of_block[block]
        assert block_hash is not None, "only cached blocks sit in the cached free list"
        self._hash_of_block[block] = None
        del self._block_of_hash[block_hash]
        return block_hash
