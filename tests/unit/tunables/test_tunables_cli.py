"""`tandem router|disagg set|show|reset`: parsed by the real parser, written to an in-memory store."""

from __future__ import annotations

import argparse

import pytest

from app.cli import build_parser
from app.disagg.tunables import DISAGG_TUNABLES, MAX_LOCAL_PREFILL_LENGTH, MAX_PREFILL_QUEUE_SIZE
from app.router.policies import POLICIES
from app.router.tunables import ROUTER_POLICY, ROUTER_TUNABLES, LivePolicy
from app.tunables import InvalidTunableError, TunableGroup
from app.tunables.cli import reset_values, set_values, show_values, values_from_args
from tests.unit.tunables.fake_tunables import FakeTunables


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def given(group: TunableGroup, *argv: str) -> dict:
    return values_from_args(group, parse(group.command, "set", *argv))


async def test_router_set_writes_the_policy_and_its_knobs() -> None:
    etcd = FakeTunables()
    values = given(ROUTER_TUNABLES, "--policy", "kv", "--knob", "overlap-weight=1.5", "--knob", "seed=3")
    assert values == {ROUTER_POLICY: LivePolicy(policy="kv", knobs={"overlap-weight": 1.5, "seed": 3})}
    lines = await set_values(etcd, values)
    assert etcd.values[ROUTER_POLICY.key] == {"policy": "kv", "knobs": {"overlap-weight": 1.5, "seed": 3}}
    assert lines == ['router/policy={"policy": "kv", "knobs": {"overlap-weight": 1.5, "seed": 3}}']


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--policy", "fastest"], "unknown router policy 'fastest'"),
        (["--policy", "kv", "--knob", "overlap_wieght=1"], "unknown knob 'overlap_wieght'"),
        (["--policy", "kv", "--knob", "seed"], "KEY=VALUE"),
        (["--knob", "seed=1"], "--knob needs --policy"),
        ([], "give --policy"),
    ],
)
def test_router_set_refuses_a_bad_value_naming_why(argv: list[str], reason: str) -> None:
    with pytest.raises(InvalidTunableError, match=reason):
        given(ROUTER_TUNABLES, *argv)


def test_the_policy_help_lists_the_registered_policies(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("router", "set", "--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert " | ".join(POLICIES) in help_text


async def test_disagg_set_writes_only_what_it_is_given() -> None:
    etcd = FakeTunables()
    assert given(DISAGG_TUNABLES, "--max-prefill-queue-size", "8") == {MAX_PREFILL_QUEUE_SIZE: 8}
    await set_values(etcd, given(DISAGG_TUNABLES, "--max-prefill-queue-size", "8"))
    assert etcd.values == {MAX_PREFILL_QUEUE_SIZE.key: 8}
    with pytest.raises(InvalidTunableError, match="give --max-local-prefill-length and/or --max-prefill-queue-size"):
        given(DISAGG_TUNABLES)
    with pytest.raises(InvalidTunableError, match="disagg/max_local_prefill_length"):
        given(DISAGG_TUNABLES, "--max-local-prefill-length", "-1")


async def test_show_says_what_applies_and_flags_an_invalid_value() -> None:
    etcd = FakeTunables({MAX_LOCAL_PREFILL_LENGTH.key: 512, MAX_PREFILL_QUEUE_SIZE.key: "eight"})
    lines = await show_values(etcd, DISAGG_TUNABLES)
    assert lines[0] == "disagg/max_local_prefill_length=512"
    assert lines[1].startswith('disagg/max_prefill_queue_size="eight"  (invalid, ignored by readers:')
    assert await show_values(etcd, ROUTER_TUNABLES) == ["router/policy: as configured (no live value)"]


async def test_reset_drops_every_value_of_the_group_and_only_those() -> None:
    policy = {"policy": "random"}
    etcd = FakeTunables({MAX_LOCAL_PREFILL_LENGTH.key: 512, MAX_PREFILL_QUEUE_SIZE.key: 8, ROUTER_POLICY.key: policy})
    assert await reset_values(etcd, DISAGG_TUNABLES) == ["disagg: back to each VllmWorker's configured thresholds"]
    assert etcd.values == {ROUTER_POLICY.key: policy}
