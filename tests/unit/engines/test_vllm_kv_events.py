"""The relay of vLLM's KV events: what it passes on, what it counts as lost, and that a relay
that stopped makes its engine count as dead (real ZeroMQ sockets, on loopback)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import msgspec
import pytest
import zmq
import zmq.asyncio
from vllm.distributed import kv_events as vllm_events

from app.engines import vllm_kv_events
from app.engines.vllm_kv_events import VllmKvEventRelay
from app.protocol import BlockRemoved, BlockStored, KvEventBatch

BLOCK_SIZE = 32
_pack = msgspec.msgpack.Encoder()


def _stored(block_hash: int, medium: str | None = vllm_events.MEDIUM_GPU) -> vllm_events.BlockStored:
    return vllm_events.BlockStored(
        block_hashes=[block_hash],
        parent_block_hash=None,
        token_ids=list(range(BLOCK_SIZE)),
        block_size=BLOCK_SIZE,
        lora_id=None,
        medium=medium,
        lora_name=None,
    )


class _Engine:
    """vLLM's publisher as its ZmqEventPublisher sends: (topic, 8-byte seq, msgpack batch)."""

    def __init__(self, endpoint: str) -> None:
        self._context = zmq.asyncio.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.connect(endpoint)

    async def send(
        self, seq: int, *events: vllm_events.BlockStored | vllm_events.BlockRemoved | vllm_events.AllBlocksCleared
    ) -> None:
        batch = vllm_events.KVEventBatch(ts=1.0, events=list(events))
        await self._pub.send_multipart((b"", seq.to_bytes(8, "big"), _pack.encode(batch)))

    def close(self) -> None:
        self._pub.close(linger=0)
        self._context.term()


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_device_events_pass_in_order_and_lost_batches_leave_a_gap() -> None:
    received: list[KvEventBatch] = []
    relay = VllmKvEventRelay("w1", received.append)
    relay.start(BLOCK_SIZE)
    engine = _Engine(relay.endpoint)
    try:
        # A PUB socket drops what it sends before the subscription reaches it: send until
        # the first batch arrives, numbering on so the relay sees no loss in between.
        seq = 0
        async with asyncio.timeout(5):
            while not received:
                await engine.send(seq, _stored(100 + seq))
                seq += 1
                await asyncio.sleep(0.02)
        first = received[-1]
        received.clear()
        # Offloaded blocks never reach the router: that batch is dropped, not counted as lost.
        await engine.send(seq, _stored(7, medium="CPU"))
        await engine.send(seq + 1, vllm_events.BlockRemoved(block_hashes=[5], medium=None))
        await engine.send(seq + 4, _stored(9))  # seq + 2 and seq + 3 never arrive
        await _until(lambda: len(received) == 2)
    finally:
        engine.close()
        await relay.stop()

    removed, after_loss = received
    assert removed.seq == first.seq + 1
    assert removed.events == [BlockRemoved(block_hashes=[5])]
    assert removed.block_size == BLOCK_SIZE and removed.worker_id == "w1"
    # Two batches lost: the router sees a gap of two in the relay's own numbering.
    assert after_loss.seq == removed.seq + 3
    assert after_loss.events == [BlockStored(token_ids=list(range(BLOCK_SIZE)), block_hashes=[9])]


async def test_a_relay_that_stopped_on_an_error_reports_why_and_a_running_one_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unforeseen(event: vllm_events.KVCacheEvent) -> None:
        # What a vLLM with event fields this relay does not know could raise: not an error
        # of one message's encoding, which the relay skips.
        raise AttributeError("'BlockStored' object has no attribute 'token_ids'")

    monkeypatch.setattr(vllm_kv_events, "convert_event", unforeseen)
    relay = VllmKvEventRelay("w1", lambda batch: None)
    assert relay.failure() is None  # not started
    relay.start(BLOCK_SIZE)
    engine = _Engine(relay.endpoint)
    try:
        await asyncio.sleep(0.05)
        assert relay.failure() is None  # waiting for events
        async with asyncio.timeout(5):
            for seq in itertools.count():
                await engine.send(seq, _stored(seq))
                await asyncio.sleep(0.02)
                if (why := relay.failure()) is not None:
                    break
    finally:
        engine.close()
        await relay.stop()  # stops what is left without raising the error again
    assert why == ("its KV event relay ended: AttributeError(\"'BlockStored' object has no attribute 'token_ids'\")")
