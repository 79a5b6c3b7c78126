"""`tandem doctor [--json] [-f CONFIG]`: checks the namespace's fleet, one line per check,
and exits non-zero if any fails (docs/operations.md).

Connects with NATS_SERVER / ETCD_ENDPOINTS like any service, in TANDEM_NAMESPACE unless
`--namespace` says otherwise; registers nothing. Only the side-channel check opens
connections of its own (to the PrefillWorkers' NIXL side channels, from this node).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from app.doctor.check import Check, Fleet

DEFAULT_LISTEN_S = 3.0


async def fleet_checks(fleet: Fleet, clock_margin_s: float, connect_timeout_s: float) -> list[Check]:
    """Every check of a running fleet, in the order they print."""
    from app.doctor.clocks import check_clocks
    from app.doctor.kv_feed import check_kv_feed
    from app.doctor.kv_layout import check_kv_layout
    from app.doctor.reach import check_side_channels
    from app.doctor.transport import check_max_payload, check_prefill_queue
    from app.doctor.versions import check_versions

    return [
        check_kv_layout(fleet),
        check_kv_feed(fleet),
        check_versions(fleet),
        check_max_payload(fleet),
        check_prefill_queue(fleet),
        check_clocks(fleet, clock_margin_s),
        await check_side_channels(fleet, connect_timeout_s),
    ]


async def _fleet_checks(args: argparse.Namespace, clock_margin_s: float) -> list[Check]:
    # Connecting needs the runtime; building the parser does not.
    from app.doctor.gather import gather_fleet
    from app.runtime import ConnectError, Runtime
    from app.settings import RuntimeSettings

    settings = RuntimeSettings() if args.namespace is None else RuntimeSettings(namespace=args.namespace)
    try:
        async with await Runtime.connect(settings) as runtime:
            fleet = await gather_fleet(runtime, args.listen)
            return await fleet_checks(fleet, clock_margin_s, args.connect_timeout)
    except ConnectError as exc:
        return [Check("connect", False, f"{exc}: check NATS_SERVER and ETCD_ENDPOINTS, and that both servers run")]


def render_text(checks: list[Check]) -> str:
    width = max(len(check.name) for check in checks)
    lines = [f"{check.verdict}  {check.name.ljust(width)}  {check.message}" for check in checks]
    failures = sum(not check.ok for check in checks)
    lines.append(f"{failures} check(s) failed" if failures else "all checks passed")
    return "\n".join(lines)


def render_json(checks: list[Check]) -> str:
    document: dict[str, Any] = {"ok": all(c.ok for c in checks), "checks": [c.to_builtins() for c in checks]}
    return json.dumps(document, indent=2, sort_keys=True)


def _doctor(args: argparse.Namespace) -> int:
    from app.doctor.clocks import clock_margin_s
    from app.doctor.static import check_config, remote_prefill_timeout_s

    checks: list[Check] = []
    config = None
    if args.config_file is not None:
        config_check, config = check_config(args.config_file)
        checks.append(config_check)
    margin_s = clock_margin_s(remote_prefill_timeout_s(config))
    checks += asyncio.run(_fleet_checks(args, margin_s))
    print(render_json(checks) if args.json else render_text(checks))
    return 0 if all(check.ok for check in checks) else 1


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `tandem doctor`."""
    parser = subparsers.add_parser(
        "doctor",
        help="check a running fleet: KV block size and hash scheme, versions, NATS max_payload, "
        "the prefill queue, KV events, clocks, NIXL side channels",
        description="One line per check, PASS, FAIL (with what to do) or SKIP (not applicable); the exit "
        "status is 1 if any check fails. Reads what the fleet publishes; docs/operations.md lists the checks.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON: {ok, checks: [{name, ok, verdict, ...}]}")
    parser.add_argument(
        "-f", "--config", dest="config_file", help="also run this graph config's static checks (`tandem config check`)"
    )
    parser.add_argument(
        "--listen",
        type=float,
        default=DEFAULT_LISTEN_S,
        metavar="SECONDS",
        help=f"hear the fleet's reports and KV events this long before checking (default {DEFAULT_LISTEN_S:g})",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long a NIXL side channel may take to accept a connection (default 2)",
    )
    parser.add_argument("--namespace", help="the namespace to check (default: TANDEM_NAMESPACE)")
    parser.set_defaults(func=_doctor)
