"""Relay vLLM's KV cache events (ZMQ PUB, msgpack) to a worker's sink as Tandem events.

vLLM's publisher binds when its endpoint has a wildcard and connects otherwise. We bind
the SUB side on an ephemeral loopback port and let the engine connect to it: no port is
guessed, nothing listens beyond loopback, and batches the engine sends before the
connection completes are queued by ZMQ instead of dropped (the PUB-bind slow-joiner).
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
import zmq
import zmq.asyncio
from vllm.distributed import kv_events as vllm_events

from app.aio import cancel_and_wait
from app.engines.base import KvEventSink
from app.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, KvEventBatch

logger = logging.getLogger(__name__)

# Blocks offloaded to a secondary tier (host memory, storage) are not where the engine
# computes from; the router must only see the device tier, or it would over-count overlap.
_DEVICE_MEDIA = (None, vllm_events.MEDIUM_GPU)


def convert_event(event: vllm_events.KVCacheEvent) -> KvEvent | None:
    """vLLM's event as Tandem's, or None for an event the router must not see."""
    if isinstance(event, vllm_events.BlockStored):
        if event.medium not in _DEVICE_MEDIA:
            return None
        return BlockStored(
            token_ids=list(event.token_ids),
            block_hashes=list(event.block_hashes),
            parent_block_hash=event.parent_block_hash,
        )
    if isinstance(event, vllm_events.BlockRemoved):
        if event.medium not in _DEVICE_MEDIA:
            return None
        return BlockRemoved(block_hashes=list(event.block_hashes))
    if isinstance(event, vllm_events.AllBlocksCleared):
        return AllBlocksCleared()
    logger.warning("ignoring unknown vLLM KV event %s", type(event).__name__)
    return None


class VllmKvEventRelay:
    """Subscribes to one engine's KV event stream and hands each batch to `sink`."""

    def __init__(self, worker_id: str, sink: KvEventSink) -> None:
        self._worker_id = worker_id
        self._sink = sink
        self._block_size = 0
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.LINGER, 0)
        port = self._socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._decoder = msgspec.msgpack.Decoder(vllm_events.KVEventBatch)
        self._task: asyncio.Task[None] | None = None
        # Our own numbering: batches with nothing for the router are dropped without a
        # gap, so a gap downstream means lost events and nothing else.
        self._next_seq = 0
        self._last_engine_seq: int | None = None

    def kv_events_config(self) -> vllm_events.KVEventsConfig:
        """The engine argument that makes vLLM publish to this relay."""
        return vllm_events.KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=self.endpoint)

    def start(self, block_size: int) -> None:
        self._block_size = block_size
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self._worker_id}")

    def failure(self) -> str | None:
        """Why the relay stopped relaying (its task ended on an error), or None while it runs.

        A worker whose relay died would keep serving while the routers' index of it goes
        stale: the engine counts as dead then (`VllmEngine.dead_reason`), so the worker
        leaves and supervisord restarts it with a fresh engine and relay.
        """
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return f"its KV event relay ended: {task.exception()!r}"

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():  # one that ended: `failure` said why
            await cancel_and_wait(self._task)
        self._task = None
        self._socket.close(linger=0)
        self._context.term()

    async def _run(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                batch = self._translate(frames)
            except (ValueError, msgspec.DecodeError):
                logger.exception("undecodable KV event message from vLLM (%d frames)", len(frames))
                continue
            if batch is None:
                continue
            try:
                self._sink(batch)
            except Exception:
                logger.exception("KV event sink failed for batch %d", batch.seq)

    def _translate(self, frames: list[bytes]) -> KvEventBatch | None:
        _topic, seq_bytes, payload = frames
        engine_seq = int.from_bytes(seq_bytes, "big")
        if self._last_engine_seq is not None and engine_seq != self._last_engine_seq + 1:
            logger.warning("lost KV event batches from vLLM: seq %d after %d", engine_seq, self._last_engine_seq)
            # Pass the loss on as a gap so the router knows its index may be stale.
            self._next_seq += max(engine_seq - self._last_engine_seq - 1, 1)
        self._last_engine_seq = engine_seq
        vllm_batch = self._decoder.decode(payload)
        events = [converted for event in vllm_batch.events if (converted := convert_event(event)) is not None]
        if not events:
            return None
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        return KvEventBatch(
            worker_id=self._worker_id,
            seq=seq,
            block_size=self._block_size,
            events=events,
            timestamp=vllm_batch.ts,
        )
