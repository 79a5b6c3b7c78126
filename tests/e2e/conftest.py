"""Shared fixtures for end-to-end tests on the real vLLM CPU engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.model.tiny import make_tiny

# The CPU build refuses to start with its default KV cache size (92 % of a NUMA node)
# and crashes on an empty value; 1 GiB is plenty for the tiny model.
if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama, served as `tiny-llama` (the directory name)."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)
