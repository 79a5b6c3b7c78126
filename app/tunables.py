"""Live tunables: settings operators change while serving, kept in etcd.

Services watch their keys and apply a change to the next request; nothing restarts.
`tandem router set|show` edits the router's. Keys (under `/tandem/<ns>/tunables/`):

| key | value | read by |
| --- | --- | --- |
| `router/policy` | `{"policy": NAME, "knobs": {...}}` | every Router replica |
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import yaml

ROUTER_POLICY = "router/policy"


def _parse_knobs(pairs: list[str]) -> dict[str, Any]:
    knobs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --knob takes KEY=VALUE, got {pair!r}")
        knobs[key] = yaml.safe_load(value)
    return knobs


async def _router_set(policy: str, knobs: dict[str, Any]) -> int:
    from app.router.policies import PolicyConfigError, create_policy
    from app.runtime import Runtime

    try:
        create_policy(policy, knobs)  # reject a bad name or knob here, not in every Router
    except (PolicyConfigError, ValueError) as exc:
        print(f"error: {exc}")
        return 1
    async with await Runtime.connect() as runtime:
        await runtime.discovery.put_tunable(ROUTER_POLICY, {"policy": policy, "knobs": knobs})
    print(f"router policy set to {policy} {json.dumps(knobs) if knobs else ''}".rstrip())
    return 0


async def _router_show() -> int:
    from app.runtime import Runtime

    async with await Runtime.connect() as runtime:
        value = await runtime.discovery.get_tunable(ROUTER_POLICY)
    print(json.dumps(value) if value is not None else "router policy: as configured (no live override)")
    return 0


async def _router_reset() -> int:
    from app.runtime import Runtime

    async with await Runtime.connect() as runtime:
        await runtime.discovery.delete_tunable(ROUTER_POLICY)
    print("router policy: back to each Router's configured policy")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `tandem router set|show|reset` (reads NATS_SERVER / ETCD_ENDPOINTS)."""
    router = subparsers.add_parser("router", help="the Routers' live policy")
    commands = router.add_subparsers(dest="router_command", required=True)
    set_ = commands.add_parser("set", help="switch every Router's policy now")
    set_.add_argument("--policy", required=True, help="kv | kv-legacy | round-robin | random | least-loaded")
    set_.add_argument("--knob", action="append", default=[], metavar="KEY=VALUE", help="a policy knob (repeatable)")
    set_.set_defaults(func=lambda args: asyncio.run(_router_set(args.policy, _parse_knobs(args.knob))))
    show = commands.add_parser("show", help="print the live policy override, if any")
    show.set_defaults(func=lambda args: asyncio.run(_router_show()))
    reset = commands.add_parser("reset", help="drop the override: each Router's config applies again")
    reset.set_defaults(func=lambda args: asyncio.run(_router_reset()))
