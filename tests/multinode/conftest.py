"""Multi-node tests start real vLLM CPU engines, as the e2e tier does."""

from __future__ import annotations

import os

# The CPU build refuses to start with its default KV cache size (92 % of a NUMA node) and
# crashes on an empty value. The vLLM reference needs it; the nodes inherit it, though the
# config's kv-cache-memory-bytes wins there.
if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
