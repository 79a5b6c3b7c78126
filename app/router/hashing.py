"""The router's own block hashes, computed from token ids.

Engines report their own block hashes, but those depend on the engine's hash seed,
LoRA, multimodal extras and version; the router keys its index by hashes it computes
itself so that the same prompt prefix has the same key on every worker and in every
router replica.

Hash of block i = H(hash of block i-1 || the block's `block_size` token ids), a 64-bit
blake2b digest: stable across processes and machines (unlike Python's `hash()`). Only
full blocks are hashed: a partial last block can't be shared by the engine's prefix
cache either.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from hashlib import blake2b

# The parent of a prompt's first block; any fixed value works as long as every router
# replica uses the same one.
ROOT_PARENT = 0


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of `token_ids`.

    `parent` is the router hash of the block just before `token_ids[0]` (None: the
    tokens start a prompt). Token ids must fit in a signed 32-bit int, as every
    tokenizer's vocabulary does.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return []
    tokens = array("i", token_ids[: num_blocks * block_size])
    if sys.byteorder == "big":
        tokens.byteswap()  # hash the same bytes on every machine
    data = tokens.tobytes()
    stride = block_size * tokens.itemsize
    prev = (ROOT_PARENT if parent is None else parent).to_bytes(8, "little")
    digests: list[bytes] = []
    append = digests.append
    # The hot loop of both ingestion and routing: kept to one C call per block.
    for start in range(0, len(data), stride):
        prev = blake2b(prev + data[start : start + stride], digest_size=8).digest()
        append(prev)
    out = array("Q", b"".join(digests))
    if sys.byteorder == "big":
        out.byteswap()
    return out.tolist()
