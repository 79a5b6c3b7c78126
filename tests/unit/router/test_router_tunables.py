"""The live router policy: a registered policy with valid knobs, or nothing applies."""

from __future__ import annotations

import pytest

from app.router.config import RouterConfig
from app.router.policies import POLICIES
from app.router.tunables import ROUTER_POLICY, LivePolicy
from app.tunables import InvalidTunableError, LiveTunables
from tests.unit.tunables.fake_tunables import FakeTunables


def test_every_registered_policy_validates_and_knobs_default_to_none() -> None:
    for name in POLICIES:
        assert ROUTER_POLICY.validate({"policy": name}) == LivePolicy(policy=name, knobs={})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"policy": "fastest"}, "unknown router policy 'fastest'"),
        ({"policy": "kv", "knobs": {"temperature": -1}}, "temperature"),
        ({"policy": "round-robin", "knobs": {"seed": 1}}, "unknown knob 'seed'"),
        ("kv", "Expected `object`"),
        ({"knobs": {}}, "missing required field `policy`"),
    ],
)
def test_an_invalid_policy_value_names_what_is_wrong(raw: object, reason: str) -> None:
    with pytest.raises(InvalidTunableError, match=reason):
        ROUTER_POLICY.validate(raw)


def test_the_default_is_the_router_configs() -> None:
    config = RouterConfig()
    assert LivePolicy(policy=config.policy, knobs=config.knobs) == ROUTER_POLICY.default


async def test_a_router_replica_gets_only_valid_policies() -> None:
    applied: list[LivePolicy] = []
    etcd = FakeTunables()
    live = LiveTunables({ROUTER_POLICY: LivePolicy(policy="kv")}, on_change=lambda _, value: applied.append(value))
    await live.start(etcd)
    etcd.put(ROUTER_POLICY.key, {"policy": "round-robin"})
    etcd.put(ROUTER_POLICY.key, {"policy": "round-robin", "knobs": {"bogus": 1}})  # ignored
    etcd.delete(ROUTER_POLICY.key)
    assert applied == [LivePolicy(policy="round-robin"), LivePolicy(policy="kv")]
