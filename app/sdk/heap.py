"""The garbage collector's settings for a serving process, once it is up.

Every streamed request allocates thousands of short-lived containers (frames, a chunk's
dicts, futures). At CPython's default young-generation threshold (700 allocations) the
collector then runs hundreds of times a second, and each older-generation pass walks what
the start-up built (imported modules, the tokenizer, templates, the engine's tables): at 64
requests in flight that was 0.3-0.4 CPU-ms per request in the Frontend (issue 20's
profile). vLLM's own server freezes its start-up heap the same way (vllm/utils/gc_utils.py).
Cycles are still collected, only less often; reference counting frees the rest as before.
"""

from __future__ import annotations

import gc

# Allocations (less deallocations) between young-generation passes: one pass per few
# requests' worth of garbage instead of several per request.
YOUNG_THRESHOLD = 50_000


def settle_heap() -> None:
    """Move what the start-up allocated out of every later collection (gc.freeze), and make
    young-generation passes rare. For a process of its own: a test that runs services in
    its own process keeps its collector as it is."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
