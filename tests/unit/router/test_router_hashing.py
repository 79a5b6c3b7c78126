"""The router's block hashes: chained, full blocks only, stable across processes."""

from __future__ import annotations

import os
import subprocess
import sys

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


def test_hashes_are_the_same_in_another_process() -> None:
    # Python randomizes str and bytes hashes per process, never int tuples: a fresh
    # interpreter with another hash seed computes the same keys.
    script = "from app.router.hashing import block_hashes; print(block_hashes(list(range(40)), 16))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str(block_hashes(list(range(40)), 16))
