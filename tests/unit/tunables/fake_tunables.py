"""An in-memory stand-in for the discovery plane's tunables (`Discovery`'s watch and keys).

It holds raw builtins, as etcd does after msgpack: what a reader validates is what an
operator (or `etcdctl put`) wrote, valid or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec


class FakeTunables:
    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self.values: dict[str, Any] = dict(values or {})
        self._listeners: list[Callable[[str, Any], None]] = []
        self.watches = 0
        self.closed = False

    # --- the watch (app.tunables.TunablesSource / TunablesFeed) ----------------------------

    async def watch_tunables(self) -> FakeTunables:
        self.watches += 1
        return self

    def add_listener(self, listener: Callable[[str, Any], None]) -> None:
        self._listeners.append(listener)

    async def close(self) -> None:
        self.closed = True

    # --- writes, as etcd would deliver them -------------------------------------------------

    def put(self, key: str, value: Any) -> None:
        self.values[key] = msgspec.to_builtins(value)
        for listener in self._listeners:
            listener(key, self.values[key])

    def delete(self, key: str) -> None:
        if self.values.pop(key, None) is not None:
            for listener in self._listeners:
                listener(key, None)

    # --- the keys (app.tunables.cli.TunablesStore) ------------------------------------------

    async def put_tunable(self, key: str, value: Any) -> None:
        self.put(key, value)

    async def get_tunable(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    async def delete_tunable(self, key: str) -> None:
        self.delete(key)
