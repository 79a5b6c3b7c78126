"""The disaggregation decision and the one-shot answer slots (no servers needed)."""

from __future__ import annotations

import asyncio

import pytest

from app.disagg.decode import PendingPrefills
from app.disagg.policy import DisaggPolicy
from app.disagg.prefill import prefill_request
from app.disagg.tunables import MAX_LOCAL_PREFILL_LENGTH, MAX_PREFILL_QUEUE_SIZE
from app.protocol import PrefillAnswer, PreprocessedRequest, SamplingOptions, StopConditions
from tests.unit.tunables.fake_tunables import FakeTunables


def _request(tokens: int) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id="r1",
        model="m",
        token_ids=list(range(tokens)),
        sampling=SamplingOptions(temperature=0.0, logprobs=2),
        stop=StopConditions(max_tokens=50, min_tokens=5),
    )


def _depth(value: int):
    async def depth() -> int:
        return value

    return depth


@pytest.mark.parametrize(
    ("conditional", "tokens", "depth", "remote"),
    [
        (False, 3, 99, True),  # unconditional: everything goes remote
        (True, 10, 0, False),  # at the length threshold: local
        (True, 11, 0, True),  # past it, queue short: remote
        (True, 11, 2, False),  # past it, queue full: local
    ],
)
async def test_policy_follows_the_thresholds(conditional, tokens, depth, remote) -> None:
    policy = DisaggPolicy(conditional, max_local_prefill_length=10, max_prefill_queue_size=2)
    assert await policy.prefill_remotely(_request(tokens), _depth(depth)) is remote


async def test_policy_follows_the_live_thresholds_and_ignores_invalid_ones() -> None:
    tunables = FakeTunables({MAX_LOCAL_PREFILL_LENGTH.key: 20})
    policy = DisaggPolicy(True, max_local_prefill_length=10, max_prefill_queue_size=2)
    await policy.start(tunables)
    assert await policy.prefill_remotely(_request(15), _depth(0)) is False  # the live 20, not the configured 10
    tunables.put(MAX_PREFILL_QUEUE_SIZE.key, 0)  # "queue full": local
    assert await policy.prefill_remotely(_request(25), _depth(0)) is False
    tunables.put(MAX_PREFILL_QUEUE_SIZE.key, -1)  # invalid: the 0 stays
    tunables.put(MAX_LOCAL_PREFILL_LENGTH.key, "many")
    assert await policy.prefill_remotely(_request(25), _depth(0)) is False
    tunables.delete(MAX_PREFILL_QUEUE_SIZE.key)  # back to the configured 2
    assert await policy.prefill_remotely(_request(25), _depth(1)) is True
    await policy.close()
    assert tunables.closed


async def test_an_answer_is_taken_once_and_a_late_one_is_discarded() -> None:
    pending = PendingPrefills()
    slot = pending.open("job", timeout_s=30)
    assert 29 < pending.time_left("job") <= 30
    answer = PrefillAnswer(job_id="job", prefill_worker_id="p1", kv_transfer_params={"remote_engine_id": "e"})
    assert pending.deliver(answer) is True
    assert (await asyncio.wait_for(slot, 1)).prefill_worker_id == "p1"
    assert pending.deliver(answer) is False  # redelivered job answered twice
    assert pending.time_left("job") == 0  # answered: a redelivery of it is skipped
    pending.open("gone", timeout_s=30)
    pending.close("gone")  # the decode worker gave up and prefilled locally
    assert pending.time_left("gone") == 0
    assert pending.deliver(PrefillAnswer(job_id="gone", prefill_worker_id="p1", kv_transfer_params={})) is False


def test_prefill_request_asks_for_one_token_and_keeps_the_kv() -> None:
    prefill = prefill_request(_request(40), attempt=1)
    assert prefill.stop.max_tokens == 1 and prefill.stop.min_tokens == 0
    assert prefill.kv_transfer_params == {"do_remote_decode": True}
    assert prefill.token_ids == list(range(40))
    assert prefill.request_id == "r1-prefill-1"
    assert prefill.sampling.logprobs is None
