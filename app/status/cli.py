"""`tandem status [--json] [--watch [SECONDS]]`: the namespace's processes, engine load,
routers, prefill queue and live tunables (app/status/model.py; docs/operations.md).

Connects with NATS_SERVER / ETCD_ENDPOINTS like any service, in TANDEM_NAMESPACE unless
`--namespace` says otherwise; registers nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Iterable
from typing import Any

from app.tunables import Tunable, TunableGroup

# Clears a terminal and puts the cursor top left: `--watch` redraws in place.
_CLEAR = "\x1b[H\x1b[2J"
DEFAULT_WATCH_S = 2.0


def _settings(namespace: str | None) -> Any:
    from app.settings import RuntimeSettings

    return RuntimeSettings() if namespace is None else RuntimeSettings(namespace=namespace)


class SnapshotFailedError(Exception):
    """etcd or NATS did not answer one look at the fleet."""


async def _main(args: argparse.Namespace, tunables: list[Tunable[Any]]) -> None:
    # Connecting needs the runtime; building the parser does not.
    from app.errors import UnavailableError
    from app.runtime import ETCD_ERRORS, Runtime
    from app.status.gather import FleetObserver
    from app.status.render import render_json, render_text

    async with await Runtime.connect(_settings(args.namespace)) as runtime:
        observer = FleetObserver(runtime, tunables)
        await observer.start()
        try:
            await observer.wait_for_reports(args.listen)
            while True:
                try:
                    status = await observer.snapshot()
                except (*ETCD_ERRORS, UnavailableError) as exc:
                    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    if args.watch is None:
                        raise SnapshotFailedError(f"etcd or NATS did not answer ({reason})") from exc
                    # A watch outlives a busy or restarting etcd: it says so and looks again.
                    print(
                        f"warning: etcd or NATS did not answer ({reason}); looking again in {args.watch:g}s",
                        file=sys.stderr,
                        flush=True,
                    )
                    await asyncio.sleep(args.watch)
                    continue
                if args.watch is None:
                    print(render_json(status) if args.json else render_text(status))
                    return
                if args.json:
                    # One document a line: a script reads the refreshes as JSON Lines.
                    print(render_json(status, indent=None), flush=True)
                else:
                    print(_CLEAR + render_text(status), flush=True)
                await asyncio.sleep(args.watch)
        finally:
            await observer.close()


def _status(args: argparse.Namespace, tunables: list[Tunable[Any]]) -> int:
    from app.runtime import ConnectError

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_main(args, tunables))
    except (ConnectError, SnapshotFailedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def add_cli(subparsers: argparse._SubParsersAction, groups: Iterable[TunableGroup]) -> None:
    """Register `tandem status`; it shows the live values of `groups`' tunables."""
    tunables = [tunable for group in groups for tunable in group.tunables]
    parser = subparsers.add_parser(
        "status",
        help="what runs in the namespace: processes, engine load, routers, prefill queue, live tunables",
        description="Reads etcd records, the load and router reports the fleet publishes, and JetStream's "
        "queue info; adds no work to serving. docs/operations.md describes the JSON.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (the shape docs/operations.md documents)")
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=DEFAULT_WATCH_S,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C; with --json, one document a line",
    )
    parser.add_argument(
        "--listen",
        type=float,
        default=2.5,
        metavar="SECONDS",
        help="wait at most this long for the workers' and routers' reports before the first status (default 2.5)",
    )
    parser.add_argument("--namespace", help="the namespace to show (default: TANDEM_NAMESPACE)")
    parser.set_defaults(func=lambda args: _status(args, tunables))
