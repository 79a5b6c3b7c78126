"""The router's block hashes: chained, full blocks only, stable across processes."""

from __future__ import annotations

from app.router.hashing import block_hashes


def test_only_full_blocks_are_hashed() -> None:
    assert len(block_hashes(list(range(47)), 16)) == 2
    assert block_hashes(list(range(15)), 16) == []


def test_hashes_chain_from_the_parent() -> None:
    tokens = list(range(100, 164))
    whole = block_hashes(tokens, 16)
    assert block_hashes(tokens[32:], 16, parent=whole[1]) == whole[2:]


def test_a_block_hash_depends_on_its_whole_prefix() -> None:
    first = block_hashes([1] * 16 + [2] * 16, 16)
    second = block_hashes([3] * 16 + [2] * 16, 16)
    assert first[1] != second[1]
    assert len(set(block_hashes([7] * 64, 16))) == 4  # identical blocks, distinct positions


def test_hashes_are_fixed_values() -> None:
    # Router replicas and restarts must agree on keys: a change here breaks them.
    assert block_hashes(list(range(32)), 16) == [10251598853290956434, 14413796365232270483]
