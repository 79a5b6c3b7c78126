"""Admission of generation requests: the Frontend's in-flight cap and each API key's limits.

A generation request is admitted by every admission that applies to it (the Frontend's
cap, then its key's) or by none, before the backend sees it; past a limit it gets 429 with
Retry-After at once, instead of queueing where its client cannot see how long it will wait.
The HTTP layer (`_Generation.run` in app/openai/app.py) enters the admission and leaves it
in one `finally`, which runs when the last byte is sent, when the request fails and when
the client disconnects (its task is cancelled): a streamed request holds its slots exactly
as long as it streams, whichever limit gave them.

Each key has its own limiter, so one key at its limits slows no other key.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from app.errors import OverloadedError
from app.openai.auth import ApiKey
from app.openai.metrics import FrontendMetrics

WINDOW_S = 60.0


class Admission(Protocol):
    def try_enter(self) -> OverloadedError | None:
        """Takes a slot, or answers why not (and takes nothing)."""

    def leave(self) -> None:
        """Gives back the slot a `try_enter` took."""


class InflightCap:
    """The Frontend's cap on its requests in flight (`max-inflight-requests`; None: no cap)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.inflight = 0

    def try_enter(self) -> OverloadedError | None:
        if self.limit is not None and self.inflight >= self.limit:
            return OverloadedError(f"{self.limit} requests are in flight already; retry shortly")
        self.inflight += 1
        return None

    def leave(self) -> None:
        self.inflight -= 1


class KeyLimiter:
    """One API key's limits: its requests in flight, and its requests in any 60 seconds.

    The minute is a sliding window of the admitted requests' times, not a counter reset on
    the minute: a client cannot send twice its limit across a minute's boundary, and the
    Retry-After of a refusal is when the oldest request leaves the window. Refused requests
    take no place in it, so a client that retries too early is not shut out for longer.
    """

    def __init__(self, key: ApiKey, metrics: FrontendMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.key_id = key.key_id
        self.max_inflight = key.limits.max_inflight
        self.requests_per_minute = key.limits.requests_per_minute
        self.inflight = 0
        self._admitted_at: deque[float] = deque()
        self._clock = clock
        self._requests = metrics.api_key_requests.labels(key.key_id)
        self._limited_inflight = metrics.api_key_limited.labels(key.key_id, "max-inflight")
        self._limited_per_minute = metrics.api_key_limited.labels(key.key_id, "requests-per-minute")

    def try_enter(self) -> OverloadedError | None:
        if self.max_inflight is not None and self.inflight >= self.max_inflight:
            self._limited_inflight.inc()
            return OverloadedError(f"this API key has {self.max_inflight} requests in flight already; retry shortly")
        now = self._clock()
        if self.requests_per_minute is not None:
            admitted_at = self._admitted_at
            while admitted_at and admitted_at[0] <= now - WINDOW_S:
                admitted_at.popleft()
            if len(admitted_at) >= self.requests_per_minute:
                self._limited_per_minute.inc()
                retry_after_s = max(1, math.ceil(admitted_at[0] + WINDOW_S - now))
                return OverloadedError(
                    f"this API key's limit of {self.requests_per_minute} requests per minute is reached; "
                    f"retry in {retry_after_s} s",
                    retry_after_s=retry_after_s,
                )
            admitted_at.append(now)
        self.inflight += 1
        self._requests.inc()
        return None

    def leave(self) -> None:
        self.inflight -= 1


class AllOf:
    """Admitted by each of `admissions`, in order, or by none of them."""

    def __init__(self, *admissions: Admission) -> None:
        self._admissions = admissions

    def try_enter(self) -> OverloadedError | None:
        entered: list[Admission] = []
        for admission in self._admissions:
            refusal = admission.try_enter()
            if refusal is not None:
                for taken in reversed(entered):
                    taken.leave()
                return refusal
            entered.append(admission)
        return None

    def leave(self) -> None:
        for admission in self._admissions:
            admission.leave()


class Admissions:
    """The admission of each request: the Frontend's cap alone without keys, with its key's
    limiter after it where the request bears a key."""

    def __init__(self, max_inflight: int | None, keys: Iterable[ApiKey], metrics: FrontendMetrics) -> None:
        self.cap = InflightCap(max_inflight)
        self._of_key: dict[ApiKey, Admission] = {key: AllOf(self.cap, KeyLimiter(key, metrics)) for key in keys}

    def of(self, key: ApiKey | None) -> Admission:
        return self.cap if key is None else self._of_key[key]
