"""Shared fixtures for end-to-end tests on the real vLLM CPU engine."""

from __future__ import annotations

import os

# The CPU build refuses to start with its default KV cache size (92 % of a NUMA node)
# and crashes on an empty value; 1 GiB is plenty for the tiny model.
if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
