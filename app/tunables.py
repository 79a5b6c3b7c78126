"""Live tunables: settings operators change while serving, kept in etcd.

Services watch their keys and apply a change to the next request; nothing restarts.
`tandem router set|show` edits the router's, `tandem disagg set|show` the disaggregation
thresholds. Keys (under `/tandem/<ns>/tunables/`):

| key | value | read by |
| --- | --- | --- |
| `router/policy` | `{"policy": NAME, "knobs": {...}}` | every Router replica |
| `disagg/max_local_prefill_length` | int: uncached prompt tokens prefilled locally | every VllmWorker with conditional disaggregation |
| `disagg/max_prefill_queue_size` | int: prefill queue depth beyond which prefill stays local | the same |
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import yaml

ROUTER_POLICY = "router/policy"
DISAGG_MAX_LOCAL_PREFILL_LENGTH = "disagg/max_local_prefill_length"
DISAGG_MAX_PREFILL_QUEUE_SIZE = "disagg/max_prefill_queue_size"
DISAGG_KEYS = (DISAGG_MAX_LOCAL_PREFILL_LENGTH, DISAGG_MAX_PREFILL_QUEUE_SIZE)


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


async def _disagg_set(values: dict[str, int | None]) -> int:
    from app.runtime import Runtime

    chosen = {key: value for key, value in values.items() if value is not None}
    if not chosen:
        print("error: give --max-local-prefill-length and/or --max-prefill-queue-size")
        return 1
    async with await Runtime.connect() as runtime:
        for key, value in chosen.items():
            await runtime.discovery.put_tunable(key, value)
    print(" ".join(f"{key}={value}" for key, value in chosen.items()))
    return 0


async def _disagg_show() -> int:
    from app.runtime import Runtime

    async with await Runtime.connect() as runtime:
        for key in DISAGG_KEYS:
            value = await runtime.discovery.get_tunable(key)
            print(f"{key}={value if value is not None else 'as configured'}")
    return 0


async def _disagg_reset() -> int:
    from app.runtime import Runtime

    async with await Runtime.connect() as runtime:
        for key in DISAGG_KEYS:
            await runtime.discovery.delete_tunable(key)
    print("disagg thresholds: back to each VllmWorker's configured values")
    return 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `tandem router set|show|reset` and `tandem disagg set|show|reset`
    (they read NATS_SERVER / ETCD_ENDPOINTS)."""
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

    disagg = subparsers.add_parser("disagg", help="the decode workers' live disaggregation thresholds")
    commands = disagg.add_subparsers(dest="disagg_command", required=True)
    set_ = commands.add_parser("set", help="change the thresholds for the next request")
    set_.add_argument("--max-local-prefill-length", type=_non_negative, help="uncached prompt tokens prefilled locally")
    set_.add_argument("--max-prefill-queue-size", type=_non_negative, help="queue depth beyond which prefill stays local")
    set_.set_defaults(
        func=lambda args: asyncio.run(
            _disagg_set({
                DISAGG_MAX_LOCAL_PREFILL_LENGTH: args.max_local_prefill_length,
                DISAGG_MAX_PREFILL_QUEUE_SIZE: args.max_prefill_queue_size,
            })
        )
    )
    show = commands.add_parser("show", help="print the live thresholds")
    show.set_defaults(func=lambda args: asyncio.run(_disagg_show()))
    reset = commands.add_parser("reset", help="drop the overrides: each VllmWorker's config applies again")
    reset.set_defaults(func=lambda args: asyncio.run(_disagg_reset()))
