"""Routing policies: a registry from the config name to the policy class.

Adding a policy: one new module with a `RoutingPolicy` subclass, one line here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.router.policies.base import (
    NoWorkersError,
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


def create_policy(name: str, knobs: Mapping[str, Any] | None = None) -> RoutingPolicy:
    try:
        policy_class = POLICIES[name]
    except KeyError:
        raise PolicyConfigError(f"unknown router policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    return policy_class.from_knobs(knobs)


__all__ = [
    "POLICIES",
    "NoWorkersError",
    "PolicyConfigError",
    "RoutingContext",
    "RoutingPolicy",
    "create_policy",
]
