"""The disaggregation decision and the one-shot answer slots (no servers needed)."""

from __future__ import annotations

import asyncio

import pytest

from app.components.disagg import DisaggPolicy, PendingPrefills, PrefillAnswer
from app.components.prefill_worker import prefill_request
from app.protocol import PreprocessedRequest, SamplingOptions, StopConditions


def _request(tokens: int) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id="r1", model="m", token_ids=list(range(tokens)),
        sampling=SamplingOptions(temperature=0.0, logprobs=2), stop=StopConditions(max_tokens=50, min_tokens=5),
    )


def _depth(value: int):
    async def depth() -> int:
        return value
    return depth


@pytest.mark.parametrize(
    ("conditional", "tokens", "depth", "remote"),
    [
        (False, 3, 99, True),    # unconditional: everything goes remote
        (True, 10, 0, False),    # at the length threshold: local
        (True, 11, 0, True),     # past it, queue short: remote
        (True, 11, 2, False),    # past it, queue full: local
    ],
)
async def test_policy_follows_the_thresholds(conditional, tokens, depth, remote) -> None:
    policy = DisaggPolicy(None, conditional, max_local_prefill_length=10, max_prefill_queue_size=2)  # type: ignore[arg-type]
    assert await policy.prefill_remotely(_request(tokens), _depth(depth)) is remote


async def test_an_answer_is_taken_once_and_a_late_one_is_discarded() -> None:
    pending = PendingPrefills()
    slot = pending.open("job")
    answer = PrefillAnswer(job_id="job", prefill_worker_id="p1", kv_transfer_params={"remote_engine_id": "e"})
    assert pending.deliver(answer) is True
    assert (await asyncio.wait_for(slot, 1)).prefill_worker_id == "p1"
    assert pending.deliver(answer) is False  # redelivered job answered twice
    pending.open("gone")
    pending.close("gone")  # the decode worker gave up and prefilled locally
    assert pending.deliver(PrefillAnswer(job_id="gone", prefill_worker_id="p1", kv_transfer_params={})) is False


def test_prefill_request_asks_for_one_token_and_keeps_the_kv() -> None:
    prefill = prefill_request(_request(40), attempt=1)
    assert prefill.stop.max_tokens == 1 and prefill.stop.min_tokens == 0
    assert prefill.kv_transfer_params == {"do_remote_decode": True}
    assert prefill.token_ids == list(range(40))
    assert prefill.request_id == "r1-prefill-1"
    assert prefill.sampling.logprobs is None
