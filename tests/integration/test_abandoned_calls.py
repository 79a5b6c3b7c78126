"""A call whose caller is gone without a word stops on the callee (real NATS and etcd).

Before, a caller's cancel was one best-effort publish: a Frontend or Processor that died
(SIGKILL, the OOM killer, a node lost) left its calls' handlers running, its workers'
streams generating to max_tokens for nobody. Now every heartbeat of a call carries a
reply subject: NATS answers it with no-responders once the caller's inbox has no
subscriber, and a caller that is alive answers for a call it no longer awaits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import pytest

from app.runtime import RequestContext, Runtime, wire
from app.runtime import requests as requests_module
from app.settings import RuntimeSettings
from tests.integration.child_process import Child

MakeRuntime = Callable[..., Awaitable[Runtime]]


class Forever:
    """A handler that yields once, then runs until it is cancelled (as a long stream does)."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.context: RequestContext | None = None

    async def __call__(self, payload: Any, ctx: RequestContext) -> AsyncGenerator[int, None]:
        self.context = ctx
        try:
            yield 0
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def test_a_call_whose_caller_was_killed_is_cancelled_within_a_few_heartbeats(
    make_runtime: MakeRuntime, runtime_settings: RuntimeSettings
) -> None:
    callee = await make_runtime()
    handler = Forever()
    await callee.serve_endpoint("Abandoned", "work", handler)
    caller = await Child.start(runtime_settings, "stream", "Abandoned", "work")
    try:
        assert await caller.read_line() == "streaming"
    finally:
        await caller.kill()  # SIGKILL: no cancel leaves it
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(handler.cancelled.wait(), 10)
    took = asyncio.get_running_loop().time() - started
    # Three heartbeats in a row find no subscriber (not one: a reconnecting caller's).
    assert (requests_module._CALLER_GONE_AFTER - 1) * wire.HEARTBEAT_S <= took <= 6
    assert handler.context is not None and handler.context.cancelled.is_set()


async def test_a_call_its_caller_gave_up_is_cancelled_even_when_the_cancel_is_lost(
    make_runtime: MakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    callee, caller = await make_runtime(), await make_runtime()
    handler = Forever()
    await callee.serve_endpoint("Abandoned", "work", handler)
    client = caller.client("Abandoned", "work")
    await client.wait_for_instances(timeout=10)
    real_publish = caller._nc.publish

    async def publish_without_cancels(subject: str, payload: bytes = b"", **kwargs: Any) -> None:
        if subject.endswith(".ctl"):  # names.control_subject
            return  # the cancel is lost (NATS away at that moment, a slow consumer dropped it)
        await real_publish(subject, payload, **kwargs)

    monkeypatch.setattr(caller._nc, "publish", publish_without_cancels)
    stream = client.stream({})
    assert await anext(stream) == 0
    await stream.aclose()  # the caller gives up; its process lives on
    await asyncio.wait_for(handler.cancelled.wait(), 3 * wire.HEARTBEAT_S)


async def test_a_live_callers_long_call_is_left_running(make_runtime: MakeRuntime) -> None:
    callee, caller = await make_runtime(), await make_runtime()
    handler = Forever()
    await callee.serve_endpoint("Abandoned", "work", handler)
    client = caller.client("Abandoned", "work")
    await client.wait_for_instances(timeout=10)
    stream = client.stream({})
    assert await anext(stream) == 0
    await asyncio.sleep((requests_module._CALLER_GONE_AFTER + 2) * wire.HEARTBEAT_S)
    assert not handler.cancelled.is_set()
    await stream.aclose()


async def test_a_burst_of_no_responders_as_after_a_nats_outage_cancels_nothing(make_runtime: MakeRuntime) -> None:
    """After an outage the callee's reconnect buffer may send several heartbeats at once,
    before the caller has subscribed again: NATS answers each with no-responders within
    milliseconds. That is no caller gone: the streak must span heartbeats' worth of time."""
    callee, caller = await make_runtime(), await make_runtime()
    handler = Forever()
    served = await callee.serve_endpoint("Abandoned", "work", handler)
    client = caller.client("Abandoned", "work")
    await client.wait_for_instances(timeout=10)
    stream = client.stream({})
    assert await anext(stream) == 0
    ((_, token),) = served._token_of.items()
    for _ in range(requests_module._CALLER_GONE_AFTER + 2):  # to a subject nobody subscribes to
        await callee._nc.publish("nobody.listens.here", wire.HEARTBEAT, reply=served._probe_prefix + token)
    await callee._nc.flush()
    await asyncio.sleep(0.5)
    assert not handler.cancelled.is_set()
    await stream.aclose()
