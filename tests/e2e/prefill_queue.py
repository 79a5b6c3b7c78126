"""A graph's prefill work queue as a test sees it from outside: the jobs it holds and every
PrefillWorker's acks, to show that a fault test's fault happened (a killed PrefillWorker
held a job, and that job was delivered again) instead of trusting that it did.

JetStream acks are NATS messages to the delivery's reply subject,
`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
so a core subscription there sees each worker's acks, naks and in-progress marks, each
naming the job (its stream sequence) and how many times the queue had delivered it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from app.protocol import PREFILL_ACK_WAIT_S, PrefillJob, names
from app.runtime.wire import decoder_for
from app.runtime.workqueue import WorkQueue
from app.settings import RuntimeSettings

# nats-py's ack_sync sends an empty payload, its ack() "+ACK"; "-NAK", "+WPI" and "+TERM" are no acks.
_ACK_PAYLOADS = (b"", b"+ACK")


@dataclass(frozen=True)
class Ack:
    seq: int  # the job's stream sequence
    delivered: int  # how many times the queue had delivered it: 2 is one redelivery


class PrefillQueueSpy:
    """`async with PrefillQueueSpy(graph.settings) as queue`: the graph's prefill queue,
    watched from a NATS connection of its own that takes no job."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self._settings = settings
        self._nc: NatsClient | None = None
        self.stream = ""
        self.acks: list[Ack] = []
        self._jobs = decoder_for(PrefillJob)

    async def __aenter__(self) -> Self:
        self._nc = await nats.connect(self._settings.nats_server)
        # The stream name as the runtime derives it (constructing a WorkQueue opens nothing).
        self.stream = WorkQueue(self._nc, self._settings.namespace, names.PREFILL_QUEUE, PREFILL_ACK_WAIT_S).stream
        await self._nc.subscribe(f"$JS.ACK.{self.stream}.>", cb=self._on_ack)
        await self._nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = None

    async def _on_ack(self, msg: Msg) -> None:
        if msg.data in _ACK_PAYLOADS:
            delivered, seq = msg.subject.split(".")[4:6]
            self.acks.append(Ack(int(seq), int(delivered)))

    def _js(self) -> JetStreamContext:
        assert self._nc is not None, "used outside its async with"
        return self._nc.jetstream()

    async def counts(self) -> tuple[int, int]:
        """(held, waiting): jobs delivered to a PrefillWorker and not acked yet, jobs not delivered."""
        (consumer,) = await self._js().consumers_info(self.stream)  # the workers' one durable consumer
        return consumer.num_ack_pending or 0, consumer.num_pending or 0

    async def wait_for(self, held: int, waiting: int = 0, timeout: float = 30.0) -> None:
        """Until at least `held` jobs are in PrefillWorkers' hands and `waiting` more wait for one."""
        counts = (0, 0)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    counts = await self.counts()
                    if counts[0] >= held and counts[1] >= waiting:
                        return
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"after {timeout:g}s (held, waiting) = {counts}, wanted ({held}, {waiting})") from None

    async def wait_drained(self, timeout: float = 30.0) -> None:
        """Until no job is held or waiting: every one was acked (after its answer was counted)."""
        counts = (0, 0)
        try:
            async with asyncio.timeout(timeout):
                while (counts := await self.counts()) != (0, 0):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"after {timeout:g}s (held, waiting) = {counts}, wanted none") from None

    async def jobs(self) -> dict[int, str]:
        """Every job still in the queue, held or waiting: stream sequence -> its request id
        (a work-queue stream deletes a job when it is acked)."""
        js = self._js()
        state = (await js.stream_info(self.stream)).state
        jobs = {}
        for seq in range(state.first_seq, state.last_seq + 1):
            with contextlib.suppress(NotFoundError):
                message = await js.get_msg(self.stream, seq=seq)
                assert message.data is not None
                jobs[seq] = self._jobs.decode(message.data).request.request_id
        return jobs

    async def wait_acked(self, seqs: Iterable[int], timeout: float = 30.0) -> None:
        """Until each of these jobs was acked (a worker acks after the decode worker took its answer)."""
        wanted = set(seqs)
        try:
            async with asyncio.timeout(timeout):
                while not wanted <= {ack.seq for ack in self.acks}:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            missing = sorted(wanted - {ack.seq for ack in self.acks})
            raise AssertionError(f"jobs {missing} not acked within {timeout:g}s; acks: {self.acks}") from None

    def redelivered(self) -> dict[int, int]:
        """Acked jobs the queue had delivered more than once: stream sequence -> deliveries."""
        return {ack.seq: ack.delivered for ack in self.acks if ack.delivered > 1}
