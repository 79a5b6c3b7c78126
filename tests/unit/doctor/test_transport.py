"""`nats-max-payload` and `prefill-queue`: NATS carries the largest request, and the
prefill queue is the work queue its contract needs."""

from __future__ import annotations

import dataclasses

from app.doctor.transport import check_max_payload, check_prefill_queue, request_frame_bytes
from app.protocol import PREFILL_ACK_WAIT_S, PrefillJob, PreprocessedRequest, SamplingOptions, StopConditions, names
from app.runtime import QueueState, queue_settings
from app.runtime.wire import encode_request
from app.runtime.workqueue import ConsumerState
from tests.unit.doctor.fleets import healthy, process, worker_model


def largest_request(max_model_len: int, block_size: int) -> PreprocessedRequest:
    """A prompt of max-model-len tokens of the largest ids, disaggregated, with sampling
    options and stop conditions of every kind set."""
    return PreprocessedRequest(
        request_id="chatcmpl-" + "f" * 128,
        model="m" * 200,
        token_ids=[2**32 - 1 - i for i in range(max_model_len)],
        sampling=SamplingOptions(
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            seed=2**63,
            logprobs=20,
            logit_bias={2**31 + i: -100.0 for i in range(300)},
            bad_words=["forbidden"] * 100,
        ),
        stop=StopConditions(max_tokens=max_model_len, stop_token_ids=[2**31 + i for i in range(100)], min_tokens=1),
        kv_transfer_params={
            "do_remote_prefill": True,
            "remote_engine_id": "e" * 64,
            "remote_block_ids": [2**31 + i for i in range(-(-max_model_len // block_size))],
            "remote_host": "10.200.300.400",
            "remote_port": 65535,
        },
    )


def test_the_frame_estimate_bounds_a_real_frame_and_its_prefill_job() -> None:
    for max_model_len, block_size in ((2048, 16), (131072, 16), (32768, 1)):
        request = largest_request(max_model_len, block_size)
        frame = encode_request("r" * 64, request)
        job = encode_request("r", PrefillJob(job_id="j" * 32, request=request, decode_worker_id="w" * 16, deadline=1.0))
        bound = request_frame_bytes(max_model_len, block_size)
        assert len(frame) <= bound and len(job) <= bound, (max_model_len, len(frame), len(job), bound)
        # Not wildly above it either: the bound is the token ids' bytes and a little.
        assert bound < 1.1 * len(frame) + 64 * 1024


def test_max_payload_passes_with_room_and_fails_naming_the_model_and_the_setting() -> None:
    assert check_max_payload(healthy(max_payload=1024 * 1024)).ok  # 2048 tokens: ~75 KB
    long_context = healthy(workers=1, routers=0, max_payload=1024 * 1024)
    long_context.models = [worker_model("w0", max_model_len=262144)]
    check = check_max_payload(long_context)
    need = request_frame_bytes(262144, 16)
    assert not check.ok
    assert (
        f"model 'tiny-llama' takes prompts of 262144 tokens, whose request frames reach {need} bytes" in check.message
    )
    assert "max_payload is 1048576" in check.message and f"max_payload: {need}" in check.message


def test_max_payload_without_workers_is_not_applicable() -> None:
    check = check_max_payload(healthy(workers=0))
    assert check.ok and not check.applicable


def good_queue(**changes: object) -> QueueState:
    expected = queue_settings("ns", names.PREFILL_QUEUE, PREFILL_ACK_WAIT_S)
    consumer = ConsumerState(
        name=expected.consumer,
        num_pending=0,
        num_ack_pending=0,
        num_waiting=2,
        num_redelivered=0,
        ack_policy="explicit",
        ack_wait_s=PREFILL_ACK_WAIT_S,
        max_deliver=-1,
    )
    queue = QueueState(
        stream=expected.stream,
        messages=0,
        consumers=[consumer],
        subjects=expected.subjects,
        retention="workqueue",
        max_msg_size=-1,
    )
    return dataclasses.replace(queue, **changes)  # type: ignore[arg-type]


def with_prefill(queue: QueueState | None) -> object:
    fleet = healthy(queue=queue)
    fleet.processes.append(process("p0", names.PREFILL_WORKER, host="10.0.0.2"))
    return fleet


def test_the_prefill_queue_as_tandem_creates_it_passes() -> None:
    check = check_prefill_queue(with_prefill(good_queue()))  # type: ignore[arg-type]
    assert check.ok and check.applicable and "ns_prefill_queue (workqueue) with consumer 'workers'" in check.message


def test_a_missing_or_misconfigured_prefill_queue_fails_with_what_differs() -> None:
    missing = check_prefill_queue(with_prefill(None))  # type: ignore[arg-type]
    assert not missing.ok and "the JetStream stream ns_prefill_queue does not exist" in missing.message
    assert "nats-server -js" in missing.message

    base = good_queue()
    slow_acks = dataclasses.replace(base.consumers[0], ack_wait_s=30.0, max_deliver=5)
    wrong = good_queue(retention="limits", consumers=[slow_acks], max_msg_size=1000)
    check = check_prefill_queue(with_prefill(wrong))  # type: ignore[arg-type]
    assert not check.ok
    assert "stream ns_prefill_queue has retention limits, not workqueue" in check.message
    assert "max_deliver 5 (expected -1), ack_wait 30.0s (expected 10s)" in check.message
    assert "stores jobs of at most 1000 bytes" in check.message
    assert "nats stream rm ns_prefill_queue" in check.message

    no_consumer = check_prefill_queue(with_prefill(good_queue(consumers=[])))  # type: ignore[arg-type]
    assert not no_consumer.ok and "has no consumer 'workers'" in no_consumer.message


def test_no_prefill_worker_is_not_applicable_even_with_a_queue() -> None:
    check = check_prefill_queue(healthy(queue=good_queue()))
    assert check.ok and not check.applicable and "no PrefillWorker" in check.message
