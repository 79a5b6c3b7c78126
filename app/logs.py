"""Log lines for events that can come by the thousand (a worker dies under a thousand
streams, a NATS blip drops frames of every call): `Throttled` writes the first at once, then
at most one every `interval_s`, each saying how many it left out since the one before. What it
leaves out still goes to DEBUG, so that a process started with debug logs loses nothing.

Per-request lines that say the request went as it should (cancelled by its client, prefilled
remotely) are DEBUG at their call sites: at INFO a busy Frontend wrote a line per request.

The base layer: imports nothing of Tandem.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

# An event of one kind is logged at the first occurrence, then at most this often.
THROTTLE_INTERVAL_S = 10.0


class Throttled:
    """One kind of event's log lines (one call site): see the module's docstring."""

    __slots__ = ("_logger", "_level", "_interval_s", "_clock", "_logged_at", "_left_out")

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.WARNING,
        interval_s: float = THROTTLE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._level = level
        self._interval_s = interval_s
        self._clock = clock
        self._logged_at: float | None = None
        self._left_out = 0

    def log(self, msg: str, *args: Any, exc_info: Any = None) -> None:
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < self._interval_s:
            self._left_out += 1
            self._logger.debug(msg, *args, exc_info=exc_info)
            return
        if self._left_out and self._logged_at is not None:
            msg = f"{msg} (and {self._left_out} more like it in the last {now - self._logged_at:.0f} s)"
        self._logger.log(self._level, msg, *args, exc_info=exc_info)
        self._logged_at, self._left_out = now, 0
