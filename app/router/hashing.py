"""The router's own block hashes, computed from token ids.

Engines report their own block hashes, but those depend on the engine's hash seed,
LoRA, multimodal extras and version; the router keys its index by hashes it computes
itself, from the token ids of prompts and of the engines' KV events alike, so that the
same prompt prefix has the same key whichever worker holds it.

Hash of block i = hash((hash of block i-1, the block's `block_size` token ids as a tuple)): CPython's
64-bit tuple hash, which for integers is the same in every process and on every machine
running CPython 3.8 or later (only str and bytes hashes are randomized per process). It
is about three times faster than a cryptographic digest here, and hashing is the hot loop
of both KV event ingestion and routing. Keys never leave the process that computed them,
so a collision costs at worst one mis-estimated overlap. Only full blocks are hashed: a
partial last block can't be shared by the engine's prefix cache either.
"""

from __future__ import annotations

from collections.abc import Sequence

# The parent of a prompt's first block.
ROOT_PARENT = 0


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of `token_ids`.

    `parent` is the router hash of the block just before `token_ids[0]` (None: the
    tokens start a prompt).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    prev = ROOT_PARENT if parent is None else parent
    hashes: list[int] = []
    append = hashes.append
    # zip() over `block_size` references to one iterator cuts the tokens into block tuples
    # in C, and drops a partial last block; a slice and a tuple per block in Python cost a
    # third more for a 4k-token prompt.
    for block in zip(*[iter(token_ids)] * block_size, strict=False):
        prev = hash((prev, block))
        append(prev)
    return hashes
