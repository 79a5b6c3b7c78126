"""The engine host sends the KV event batches of KV_WINDOW_S as one message (batches
first_seq..seq, their events in order), and never so that a router could mistake what it
got: an engine's own gap, a dump of the cache, and a stop each send what is held first.

The host runs a real mocker (it makes no batches of its own here: no requests); only the
runtime is an in-memory fake that records what the host publishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import msgspec
import pytest

from app.engines.host import KV_WINDOW_S, EngineHost, WorkerConfig
from app.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch, ModelRecord, names
from app.router.index import KvIndex
from app.runtime import Runtime
from app.sdk import ServiceContext
from app.sdk.config import GraphConfig

WORKER = "worker-1"
BLOCK = 4


class FakeDiscovery:
    async def register_model(self, record: ModelRecord) -> None:
        pass

    async def deregister_model(self, record: ModelRecord) -> None:
        pass


class RecordingRuntime:
    """What EngineHost asks of the runtime; its KV messages are kept, as they go on the wire."""

    instance_id = WORKER
    host = "127.0.0.1"
    namespace = "test"

    def __init__(self) -> None:
        self.discovery = FakeDiscovery()
        self.kv: list[KvEventBatch] = []

    async def publish(self, topic: str, message: Any) -> None:
        if topic == names.KV_EVENTS_TOPIC:
            self.kv.append(msgspec.msgpack.decode(msgspec.msgpack.encode(message), type=KvEventBatch))


@pytest.fixture
async def host() -> AsyncIterator[tuple[EngineHost, RecordingRuntime]]:
    runtime = RecordingRuntime()
    ctx = ServiceContext("VllmWorker", 0, None, GraphConfig(None), lambda reason: None)
    config = WorkerConfig(engine="mocker", engine_args={"block_size": BLOCK})
    engine_host = EngineHost("VllmWorker", "generate", config, ctx, cast(Runtime, runtime))
    await engine_host.start()
    try:
        yield engine_host, runtime
    finally:
        await engine_host.stop()


def batch(seq: int, block_hash: int, block_size: int = BLOCK) -> KvEventBatch:
    """The engine's batch `seq`: it cached one block, `block_hash`, after `block_hash - 1`."""
    parent = block_hash - 1 if block_hash else None
    stored = BlockStored(token_ids=[block_hash] * block_size, block_hashes=[block_hash], parent_block_hash=parent)
    return KvEventBatch(worker_id=WORKER, seq=seq, block_size=block_size, events=[stored], timestamp=float(seq))


async def window_passed() -> None:
    await asyncio.sleep(KV_WINDOW_S * 4)


def covered(messages: list[KvEventBatch]) -> list[tuple[int, int]]:
    return [(message.seq_from, message.seq) for message in messages]


async def test_the_batches_of_one_window_go_out_as_one_message_their_events_in_order(
    host: tuple[EngineHost, RecordingRuntime],
) -> None:
    engine_host, runtime = host
    engine_host._publish_kv(batch(0, 0))
    await asyncio.sleep(0)
    engine_host._publish_kv(batch(1, 1))
    engine_host._publish_kv(batch(2, 2))
    await asyncio.sleep(0)
    assert runtime.kv == []  # held for the window
    await window_passed()
    assert covered(runtime.kv) == [(0, 2)]
    (message,) = runtime.kv
    assert message.first_seq == 0 and message.timestamp == 2.0
    assert [event.block_hashes for event in message.events] == [[0], [1], [2]]  # type: ignore[union-attr]
    # The next batch, after that message went, starts another.
    engine_host._publish_kv(batch(3, 3))
    await window_passed()
    assert covered(runtime.kv) == [(0, 2), (3, 3)]
    # A message of one batch is the batch, as workers without the window send it.
    assert runtime.kv[1] == batch(3, 3) and runtime.kv[1].first_seq is None
    assert b"first_seq" not in msgspec.msgpack.encode(runtime.kv[1])


async def test_a_router_applies_the_messages_as_it_would_the_batches(
    host: tuple[EngineHost, RecordingRuntime],
) -> None:
    engine_host, runtime = host
    for seq in range(12):
        engine_host._publish_kv(batch(seq, seq))
        if seq % 5 == 4:
            await window_passed()
    await window_passed()
    assert covered(runtime.kv) == [(0, 4), (5, 9), (10, 11)]
    index = KvIndex(BLOCK)
    for message in runtime.kv:
        index.apply_batch(message)
    assert index.seq_gaps == 0 and index.stale_batches == 0
    prompt = [token for seq in range(12) for token in [seq] * BLOCK]
    assert index.find_matches_for_tokens(prompt) == {WORKER: 12}  # nothing lost


async def test_an_engine_gap_or_a_block_size_change_is_never_merged_over(
    host: tuple[EngineHost, RecordingRuntime],
) -> None:
    engine_host, runtime = host
    engine_host._publish_kv(batch(0, 0))
    engine_host._publish_kv(batch(1, 1))
    engine_host._publish_kv(batch(4, 2))  # the engine lost 2 and 3: the routers must see a gap
    engine_host._publish_kv(batch(5, 3))
    engine_host._publish_kv(batch(6, 4, block_size=2 * BLOCK))
    await window_passed()
    assert covered(runtime.kv) == [(0, 1), (4, 5), (6, 6)]
    assert [message.block_size for message in runtime.kv] == [BLOCK, BLOCK, 2 * BLOCK]
    index = KvIndex(BLOCK)
    index.apply_batch(runtime.kv[0])
    index.apply_batch(runtime.kv[1])
    assert index.seq_gaps == 1


async def test_a_dump_of_the_cache_sends_the_held_batches_first(host: tuple[EngineHost, RecordingRuntime]) -> None:
    engine_host, runtime = host
    engine_host._publish_kv(batch(0, 0))
    engine_host._publish_kv(batch(1, 1))
    dump = engine_host.kv_blocks()
    engine_host._publish_kv(batch(2, 2))
    await window_passed()
    # The dump is as of seq 1; no message straddles it, so a router skips or applies each whole.
    assert dump[0].seq == 1 and isinstance(dump[0].events[0], AllBlocksCleared)
    assert covered(runtime.kv) == [(0, 1), (2, 2)]
    index = KvIndex(BLOCK)
    index.replace_worker(WORKER, dump)
    for message in runtime.kv:
        index.apply_batch(message)
    assert index.stale_batches == 1 and index.seq_gaps == 0
    assert index.find_matches_for_tokens([0] * BLOCK + [1] * BLOCK + [2] * BLOCK) == {WORKER: 3}


async def test_a_stop_sends_what_is_held() -> None:
    runtime = RecordingRuntime()
    ctx = ServiceContext("VllmWorker", 0, None, GraphConfig(None), lambda reason: None)
    engine_host = EngineHost(
        "VllmWorker", "generate", WorkerConfig(engine="mocker", engine_args={}), ctx, cast(Runtime, runtime)
    )
    await engine_host.start()
    engine_host._publish_kv(batch(0, 0))
    engine_host._publish_kv(
        KvEventBatch(worker_id=WORKER, seq=1, block_size=BLOCK, events=[BlockRemoved(block_hashes=[0])])
    )
    await engine_host.stop()
    await asyncio.sleep(0)
    assert covered(runtime.kv) == [(0, 1)]
