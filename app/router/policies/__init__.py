"""Routing policies: a registry from the config name to the policy class.

Adding a policy: one new module with a `RoutingPolicy` subclass, one line here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator

from app.router.policies.base import (
    PolicyConfigError,
    RoutingContext,
    RoutingPolicy,
)
from app.router.policies.kv import KvPolicy
from app.router.policies.kv_legacy import KvLegacyPolicy
from app.router.policies.least_loaded import LeastLoadedPolicy
from app.router.policies.round_robin import RoundRobinPolicy
from app.router.policies.uniform_random import RandomPolicy

POLICIES: dict[str, type[RoutingPolicy]] = {
    KvPolicy.name: KvPolicy,
    KvLegacyPolicy.name: KvLegacyPolicy,
    RoundRobinPolicy.name: RoundRobinPolicy,
    RandomPolicy.name: RandomPolicy,
    LeastLoadedPolicy.name: LeastLoadedPolicy,
}


def _policy_class(name: str) -> type[RoutingPolicy]:
    try:
        return POLICIES[name]
    except KeyError:
        raise PolicyConfigError(f"unknown router policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None


def create_policy(name: str, knobs: Mapping[str, Any] | None = None) -> RoutingPolicy:
    return _policy_class(name).from_knobs(knobs)


def _registered(name: str) -> str:
    _policy_class(name)  # PolicyConfigError, a ValueError: pydantic reports it under the key
    return name


# A config key that names a policy (the Router section's `policy`): checked when the config loads.
PolicyName = Annotated[str, AfterValidator(_registered)]


__all__ = [
    "POLICIES",
    "PolicyConfigError",
    "PolicyName",
    "RoutingContext",
    "RoutingPolicy",
    "create_policy",
]
