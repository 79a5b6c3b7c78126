"""`tandem <group> set|show|reset` for every declared group of live tunables.

The commands connect with NATS_SERVER / ETCD_ENDPOINTS like any service. set validates
each value against its declaration before writing, so a bad value is refused here with
the reason, not logged by every reader.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

import msgspec

from app.tunables.declaration import InvalidTunableError, Tunable, TunableGroup


class TunablesStore(Protocol):
    """The discovery plane's tunable keys (`Discovery` implements it)."""

    async def put_tunable(self, key: str, value: Any) -> None: ...

    async def get_tunable(self, key: str, default: Any = None) -> Any: ...

    async def delete_tunable(self, key: str) -> None: ...


def _show(value: Any) -> str:
    return json.dumps(msgspec.to_builtins(value))


async def set_values(store: TunablesStore, values: dict[Tunable[Any], Any]) -> list[str]:
    for tunable, value in values.items():
        await store.put_tunable(tunable.key, value)
    return [f"{tunable.key}={_show(value)}" for tunable, value in values.items()]


async def show_values(store: TunablesStore, group: TunableGroup) -> list[str]:
    lines = []
    for tunable in group.tunables:
        raw = await store.get_tunable(tunable.key)
        if raw is None:
            lines.append(f"{tunable.key}: as configured (no live value)")
            continue
        try:
            tunable.validate(raw)
        except InvalidTunableError as exc:
            lines.append(f"{tunable.key}={_show(raw)}  (invalid, ignored by readers: {exc})")
            continue
        lines.append(f"{tunable.key}={_show(raw)}")
    return lines


async def reset_values(store: TunablesStore, group: TunableGroup) -> list[str]:
    for tunable in group.tunables:
        await store.delete_tunable(tunable.key)
    return [f"{group.command}: back to {group.configured}"]


def values_from_args(group: TunableGroup, args: argparse.Namespace) -> dict[Tunable[Any], Any]:
    """The values the command line gives; raises InvalidTunableError for a bad or missing one."""
    values = {}
    for tunable in group.tunables:
        value = tunable.value_from_args(args)
        if value is not None:
            values[tunable] = value
    if not values:
        options = " and/or ".join(tunable.option for tunable in group.tunables)
        raise InvalidTunableError(f"give {options}")
    return values


def _run(action: Callable[[TunablesStore], Coroutine[Any, Any, list[str]]]) -> int:
    from app.runtime import Runtime  # connecting needs it; building the parser does not

    async def main() -> None:
        async with await Runtime.connect() as runtime:
            lines = await action(runtime.discovery)
        for line in lines:
            print(line)

    asyncio.run(main())
    return 0


def _set(group: TunableGroup, args: argparse.Namespace) -> int:
    try:
        values = values_from_args(group, args)
    except InvalidTunableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return _run(lambda store: set_values(store, values))


def add_cli(subparsers: argparse._SubParsersAction, groups: Iterable[TunableGroup]) -> None:
    """Register `tandem <group.command> set|show|reset` for each group."""
    for group in groups:
        parser = subparsers.add_parser(group.command, help=group.help)
        commands = parser.add_subparsers(dest=f"{group.command}_command", required=True)
        set_ = commands.add_parser("set", help="change live values: every reader applies them to its next request")
        for tunable in group.tunables:
            tunable.add_arguments(set_)
        set_.set_defaults(func=lambda args, group=group: _set(group, args))
        show = commands.add_parser("show", help="print the live values")
        show.set_defaults(func=lambda args, group=group: _run(lambda store: show_values(store, group)))
        reset = commands.add_parser("reset", help=f"drop the live values, back to {group.configured}")
        reset.set_defaults(func=lambda args, group=group: _run(lambda store: reset_values(store, group)))
