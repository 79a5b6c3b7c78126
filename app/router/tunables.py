"""The router's live tunable: `router/policy`, read by every router replica (Router
services and Frontends that embed the router), set with `tandem router set`."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
import yaml

from app.router.policies import POLICIES, create_policy
from app.tunables import InvalidTunableError, Tunable, TunableGroup


class LivePolicy(msgspec.Struct, kw_only=True):
    """A registered policy and its knobs; both checked when the value is built."""

    policy: str
    knobs: dict[str, Any] = {}

    def __post_init__(self) -> None:
        create_policy(self.policy, self.knobs)  # PolicyConfigError (a ValueError) names what is wrong


class PolicyTunable(Tunable[LivePolicy]):
    """On the command line the value is two options: `--policy NAME [--knob KEY=VALUE ...]`."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--policy", help=f"the routing policy: {' | '.join(POLICIES)}")
        parser.add_argument(
            "--knob",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a knob of that policy, its value read as YAML (repeatable)",
        )

    def value_from_args(self, args: argparse.Namespace) -> LivePolicy | None:
        if args.policy is None:
            if args.knob:
                raise InvalidTunableError("--knob needs --policy")
            return None
        return self.validate({"policy": args.policy, "knobs": _parse_knobs(args.knob)})


def _parse_knobs(pairs: list[str]) -> dict[str, Any]:
    knobs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidTunableError(f"--knob takes KEY=VALUE, got {pair!r}")
        knobs[key] = yaml.safe_load(value)
    return knobs


ROUTER_POLICY = PolicyTunable(
    key="router/policy",
    type=LivePolicy,
    default=LivePolicy(policy="kv"),
    doc="the routing policy and its knobs, instead of each router replica's configured ones",
)

ROUTER_TUNABLES = TunableGroup(
    command="router",
    help="the router replicas' live policy",
    tunables=(ROUTER_POLICY,),
    configured="each router replica's configured policy",
)
