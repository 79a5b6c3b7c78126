"""settle_heap: what a serving process does to its collector once it is up (app/sdk/heap.py).
Run in a child interpreter: the collector's settings are the whole process's."""

from __future__ import annotations

import json
import subprocess
import sys

from app.sdk.heap import YOUNG_THRESHOLD

CHILD = """
import gc, json
from app.sdk.heap import settle_heap
before = gc.get_threshold()
start_up = [[i] for i in range(10_000)]  # what a start-up leaves: tracked containers
settle_heap()
frozen = gc.get_freeze_count()
cycle = []; cycle.append(cycle); del cycle  # garbage only the collector can free
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": frozen,
                  "found_by_full_pass": gc.collect()}))
"""


def test_the_start_up_heap_is_frozen_young_passes_are_rare_and_cycles_still_collected() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen["frozen"] >= 10_000, seen
    assert seen["after"] == [YOUNG_THRESHOLD, *seen["before"][1:]], seen
    assert seen["before"][0] < YOUNG_THRESHOLD, seen
    assert seen["found_by_full_pass"] >= 1, seen  # a cycle made after the freeze is still garbage
