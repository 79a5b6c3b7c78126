"""Checks `nats-max-payload` and `prefill-queue`: NATS carries the largest request the
fleet accepts, and the JetStream prefill queue is set up as its contract needs.

The largest message is a `generate` call (Processor -> VllmWorker) or a prefill job (the
same request, on JetStream) for a prompt of the model's `max-model-len` tokens. NATS
refuses a message past the server's `max_payload` (1 MiB by default): the Frontend then
answers such prompts 413, however short the model's context says they are.
"""

from __future__ import annotations

import math

from app.doctor.check import Check, Fleet, failed, not_applicable, passed
from app.protocol import PREFILL_ACK_WAIT_S, names
from app.runtime import queue_settings

# A token id in msgpack takes 1, 2, 3 or 5 bytes by its value (positive fixint, uint8,
# uint16, uint32): any vocabulary past 65,536 ids (Llama 3's 128k) has prompts of mostly
# 5-byte ids, so 5 bytes a token is what a long prompt may take.
TOKEN_ID_BYTES = 5
# A disaggregated request also carries the prefill's KV block ids (kv_transfer_params):
# one id a block, 5 bytes at most.
BLOCK_ID_BYTES = 5
# The rest of the frame: the envelope, request id, model name, sampling options and stop
# conditions. 64 KiB leaves room for a JSON schema or stop words of tens of KiB; larger
# ones are the client's, not the model's, and the Frontend's 413 names the limit.
# tests/unit/doctor/test_transport.py encodes a full frame and checks it stays under.
FRAME_OVERHEAD_BYTES = 64 * 1024

NATS_NAME = "nats-max-payload"
QUEUE_NAME = "prefill-queue"


def request_frame_bytes(max_model_len: int, block_size: int) -> int:
    """An upper bound of the largest request frame for a prompt of `max_model_len` tokens."""
    blocks = math.ceil(max_model_len / max(block_size, 1))
    return TOKEN_ID_BYTES * max_model_len + BLOCK_ID_BYTES * blocks + FRAME_OVERHEAD_BYTES


def check_max_payload(fleet: Fleet) -> Check:
    workers = fleet.worker_models()
    if not workers:
        return not_applicable(NATS_NAME, "no VllmWorker registered a model (its max-model-len sets the need)")
    needs: dict[str, tuple[int, int, int]] = {}  # model -> (frame bytes, max-model-len, block size)
    for record in workers:
        max_len, block_size = int(record.metadata["max_model_len"]), int(record.metadata["block_size"])
        this = (request_frame_bytes(max_len, block_size), max_len, block_size)
        needs[record.name] = max(needs.get(record.name, this), this)
    problems = [
        f"model {name!r} takes prompts of {max_len} tokens, whose request frames reach {need} bytes, "
        f"but the NATS server's max_payload is {fleet.max_payload}"
        for name, (need, max_len, _block) in sorted(needs.items())
        if need > fleet.max_payload
    ]
    need, max_len, _block = max(needs.values())
    if problems:
        return failed(
            NATS_NAME,
            problems,
            f"Start nats-server with max_payload of at least {need} (its config file: `max_payload: {need}`; "
            "it may be raised to 64 MB), or serve a smaller max-model-len",
        )
    return passed(
        NATS_NAME,
        f"max_payload {fleet.max_payload} >= {need} bytes, the largest request frame "
        f"(max-model-len {max_len}, at {TOKEN_ID_BYTES} bytes a token id)",
    )


def check_prefill_queue(fleet: Fleet) -> Check:
    prefill_workers = fleet.of_service(names.PREFILL_WORKER)
    if not prefill_workers:
        return not_applicable(QUEUE_NAME, "no PrefillWorker: no job goes through the prefill queue")
    expected = queue_settings(fleet.namespace, names.PREFILL_QUEUE, PREFILL_ACK_WAIT_S)
    recreate = (
        "JetStream keeps the settings of whoever created the stream first: delete it "
        f"(`nats stream rm {expected.stream}`) and restart the PrefillWorkers and VllmWorkers, "
        "which create it as Tandem needs"
    )
    queue = fleet.queue
    if queue is None:
        return failed(
            QUEUE_NAME,
            [f"{len(prefill_workers)} PrefillWorker(s) run, but the JetStream stream {expected.stream} does not exist"],
            "Is JetStream on (nats-server -js)? The workers' logs say why they could not create it",
        )
    problems = []
    if queue.retention != expected.retention:
        problems.append(f"stream {queue.stream} has retention {queue.retention}, not {expected.retention}")
    if not set(expected.subjects) <= set(queue.subjects):
        problems.append(f"stream {queue.stream} takes subjects {list(queue.subjects)}, not {list(expected.subjects)}")
    consumer = next((c for c in queue.consumers if c.name == expected.consumer), None)
    if consumer is None:
        problems.append(f"stream {queue.stream} has no consumer {expected.consumer!r}")
    else:
        wrong = [
            f"{what} {actual} (expected {wanted})"
            for what, actual, wanted in (
                ("ack_policy", consumer.ack_policy, expected.ack_policy),
                ("max_deliver", consumer.max_deliver, expected.max_deliver),
            )
            if actual != wanted
        ]
        if consumer.ack_wait_s is None or abs(consumer.ack_wait_s - expected.ack_wait_s) > 0.001:
            wrong.append(f"ack_wait {consumer.ack_wait_s}s (expected {expected.ack_wait_s:g}s)")
        if wrong:
            problems.append(f"consumer {expected.consumer!r} of {queue.stream} has {', '.join(wrong)}")
    workers = fleet.worker_models()
    if queue.max_msg_size is not None and queue.max_msg_size > 0 and workers:
        need = max(
            request_frame_bytes(int(w.metadata["max_model_len"]), int(w.metadata["block_size"])) for w in workers
        )
        if queue.max_msg_size < need:
            problems.append(f"stream {queue.stream} stores jobs of at most {queue.max_msg_size} bytes, {need} needed")
    if problems:
        return failed(QUEUE_NAME, problems, recreate)
    return passed(
        QUEUE_NAME,
        f"stream {queue.stream} ({queue.retention}) with consumer {expected.consumer!r} "
        f"(explicit ack, ack_wait {expected.ack_wait_s:g}s, redelivered without limit); "
        f"{len(prefill_workers)} PrefillWorker(s)",
    )
