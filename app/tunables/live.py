"""Validated live values: what a service reads its tunables through.

One etcd watch per consumer, fed by the discovery plane (`Discovery.watch_tunables`, or
any object with that method). Every value that arrives is validated against its
declaration once, when it arrives: a valid one replaces the current value and is handed
to `on_change`; an invalid one is logged and ignored, so the tunable keeps the value it
had (a typo in `etcdctl put` must not take routing down). A deleted key falls back to the
value the consumer was configured with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar, cast

from app.tunables.declaration import InvalidTunableError, Tunable

log = logging.getLogger(__name__)

T = TypeVar("T")


class TunablesFeed(Protocol):
    """The discovery's live view of every tunable: key -> raw value (builtins)."""

    @property
    def values(self) -> Mapping[str, Any]: ...

    def add_listener(self, listener: Callable[[str, Any], None]) -> None:
        """`listener(key, value)` on every change; value None means the key was deleted."""

    async def close(self) -> None: ...


class TunablesSource(Protocol):
    async def watch_tunables(self) -> TunablesFeed: ...


OnChange = Callable[[Tunable[Any], Any], None]


class LiveTunables:
    """The current value of each of some tunables: the live one, else the configured one."""

    def __init__(self, configured: Mapping[Tunable[Any], Any], on_change: OnChange | None = None) -> None:
        """`configured`: each tunable's value from the consumer's config; it applies until
        (and whenever) etcd holds no valid value. Until `start`, `get` returns it."""
        self._configured = dict(configured)
        self._current = dict(configured)
        self._by_key = {tunable.key: tunable for tunable in configured}
        self._on_change = on_change
        self._feed: TunablesFeed | None = None

    def get(self, tunable: Tunable[T]) -> T:
        return cast(T, self._current[tunable])

    async def start(self, source: TunablesSource) -> None:
        self._feed = await source.watch_tunables()
        for key, raw in list(self._feed.values.items()):
            self._apply(key, raw)
        self._feed.add_listener(self._apply)

    async def close(self) -> None:
        if self._feed is not None:
            await self._feed.close()
            self._feed = None

    def _apply(self, key: str, raw: Any) -> None:
        # Runs inside the etcd watch task: nothing may escape, or the watch would stop.
        tunable = self._by_key.get(key)
        if tunable is None:
            return
        if raw is None:
            value = self._configured[tunable]
        else:
            try:
                value = tunable.validate(raw)
            except InvalidTunableError as exc:
                log.warning("live tunable %r ignored (%s); keeping %r", raw, exc, self._current[tunable])
                return
        if value == self._current[tunable]:
            return
        self._current[tunable] = value
        log.info("live tunable %s: %r%s", key, value, " (as configured)" if raw is None else "")
        if self._on_change is not None:
            try:
                self._on_change(tunable, value)
            except Exception:
                log.exception("applying live tunable %s = %r failed", key, value)
