"""Multi-node tests start real vLLM CPU engines, as the e2e tier does, on network
namespaces: without root they are skipped, and fail where CI runs them (tests/capabilities.py)."""

from __future__ import annotations

import os

import pytest

from tests.capabilities import require_fabric

# The CPU build refuses to start with its default KV cache size (92 % of a NUMA node) and
# crashes on an empty value. The vLLM reference needs it; the nodes inherit it, though the
# config's kv-cache-memory-bytes wins there.
if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"


@pytest.fixture(autouse=True, scope="module")
def _network_namespaces() -> None:
    # Module-scoped and autouse: before each module's own fixtures (the vLLM reference, the cluster).
    require_fabric()
