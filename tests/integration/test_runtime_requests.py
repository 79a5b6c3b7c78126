"""Requests plane on real NATS + etcd: streaming, errors, cancellation, instance choice."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import msgspec
import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from app.errors import InternalError, InvalidRequestError
from app.runtime import (
    CallTimeoutError,
    InstanceGoneError,
    NoInstancesError,
    RequestContext,
    Runtime,
    wire,
)
from app.settings import RuntimeSettings
from tests.integration.child_process import Child

MakeRuntime = Callable[..., Awaitable[Runtime]]


class Count(msgspec.Struct):
    n: int


class Item(msgspec.Struct):
    index: int
    text: str


class BadPromptError(InvalidRequestError):
    """A handler's own error class: the caller gets the class of its code."""


async def count_to(request: Count, ctx: RequestContext) -> AsyncGenerator[Item, None]:
    for i in range(request.n):
        yield Item(i, f"item {i}")


async def test_stream_delivers_1000_frames_in_order(make_runtime: MakeRuntime) -> None:
    server, caller = await make_runtime(), await make_runtime()
    await server.serve_endpoint("Counter", "count", count_to, request_type=Count)
    client = caller.client("Counter", "count")
    await client.wait_for_instances(timeout=5)

    items = [item async for item in client.stream(Count(1000), response_type=Item)]

    assert items == [Item(i, f"item {i}") for i in range(1000)]


async def test_builtins_round_trip_without_types(make_runtime: MakeRuntime) -> None:
    rt = await make_runtime()

    async def echo(payload: Any, ctx: RequestContext) -> AsyncGenerator[Any, None]:
        yield {"got": payload, "request_id": ctx.request_id}

    await rt.serve_endpoint("Echo", "echo", echo)
    reply = await rt.client("Echo", "echo").call({"a": [1, 2]}, request_id="req-7")
    assert reply == {"got": {"a": [1, 2]}, "request_id": "req-7"}


async def test_callee_errors_arrive_as_their_code_with_their_message(make_runtime: MakeRuntime) -> None:
    rt = await make_runtime()

    async def failing(payload: Any, ctx: RequestContext) -> AsyncGenerator[int, None]:
        yield 1
        if payload == "bad":
            raise BadPromptError("prompt too long")
        raise KeyError("boom")

    await rt.serve_endpoint("Failing", "go", failing)
    client = rt.client("Failing", "go")

    received = []
    with pytest.raises(InvalidRequestError) as caught:
        async for item in client.stream("bad"):
            received.append(item)
    assert received == [1]
    assert (caught.value.code, caught.value.message, caught.value.status) == ("invalid_request", "prompt too long", 400)

    # A bug in the callee: the caller learns which endpoint failed, nothing of its internals.
    with pytest.raises(InternalError) as internal:
        await client.call("other")
    assert internal.value.status == 500
    assert "Failing/go" in internal.value.message and "boom" not in internal.value.message


async def test_invalid_request_is_a_400(make_runtime: MakeRuntime) -> None:
    rt = await make_runtime()
    await rt.serve_endpoint("Counter", "count", count_to, request_type=Count)
    with pytest.raises(InvalidRequestError) as caught:
        await rt.client("Counter", "count").call({"n": "not a number"})
    assert caught.value.status == 400


async def test_caller_cancellation_runs_the_callee_finally(make_runtime: MakeRuntime) -> None:
    server, caller = await make_runtime(), await make_runtime()
    started, finished = asyncio.Event(), asyncio.Event()
    seen_cancel: list[bool] = []

    async def endless(payload: Any, ctx: RequestContext) -> AsyncGenerator[int, None]:
        started.set()
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.01)
        finally:
            seen_cancel.append(ctx.cancelled.is_set())
            finished.set()

    await server.serve_endpoint("Endless", "go", endless)
    stream = caller.client("Endless", "go").stream(None)
    assert await anext(stream) == 0
    await stream.aclose()
    await asyncio.wait_for(finished.wait(), timeout=5)
    assert seen_cancel == [True]

    # Cancelling the task that iterates has the same effect.
    started.clear()
    finished.clear()

    async def consume() -> None:
        async for _ in caller.client("Endless", "go").stream(None):
            pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), timeout=5)
    task.cancel()
    await asyncio.wait_for(finished.wait(), timeout=5)


async def test_no_instances_fails_fast(make_runtime: MakeRuntime) -> None:
    rt = await make_runtime()
    start = time.monotonic()
    with pytest.raises(NoInstancesError):
        await rt.client("Nobody", "home").call({})
    assert time.monotonic() - start < 1.0
    with pytest.raises(NoInstancesError):
        await rt.client("Nobody", "home").wait_for_instances(timeout=0.2)


async def test_round_robin_alternates_and_direct_hits_the_named_instance(make_runtime: MakeRuntime) -> None:
    first, second, caller = await make_runtime(), await make_runtime(), await make_runtime()

    def answering(instance_id: str) -> Callable[[Any, RequestContext], AsyncGenerator[str, None]]:
        async def whoami(payload: Any, ctx: RequestContext) -> AsyncGenerator[str, None]:
            yield instance_id

        return whoami

    for rt in (first, second):
        await rt.serve_endpoint("Who", "ami", answering(rt.instance_id))
    client = caller.client("Who", "ami")
    await asyncio.wait_for(_until(lambda: len(client.instance_ids()) == 2, client), timeout=5)

    answers = [await client.call(None, target="round_robin") for _ in range(6)]
    assert set(answers) == {first.instance_id, second.instance_id}
    assert all(a != b for a, b in itertools.pairwise(answers))

    for rt in (first, second):
        assert [await client.call(None, target=rt.instance_id) for _ in range(3)] == [rt.instance_id] * 3
    with pytest.raises(InstanceGoneError):
        await client.call(None, target="123abc")


async def _pid(payload: Any, ctx: RequestContext) -> AsyncGenerator[int, None]:
    yield os.getpid()


async def _until_nobody_subscribes(nats_url: str, subject: str, timeout: float = 10.0) -> None:
    """Until NATS answers a request to `subject` with no-responders: it dropped the
    subscriptions of the process that held them (a request to a dead one times out)."""
    nc = await nats.connect(nats_url)
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await nc.request(subject, b"", timeout=0.5)
                except NoRespondersError:
                    return
                except NatsTimeoutError:
                    continue
    finally:
        await nc.close()


async def test_a_record_that_outlived_its_process_gets_no_responders_and_the_call_goes_to_another(
    make_runtime: MakeRuntime, runtime_settings: RuntimeSettings
) -> None:
    """SIGKILL ends a process's NATS subscriptions at once, while its etcd record lives on
    until its lease expires: a call that picks it hears NATS's no-responders at once and
    is sent again to another instance, and the dead one is not picked again meanwhile."""
    # Far past the test's time bound: a call that waited for the dead instance to accept
    # (instead of hearing no-responders) would fail that bound, or fail with
    # InstanceGoneError after it.
    caller, live = await make_runtime(request_ack_timeout_s=30), await make_runtime()
    await live.serve_endpoint("Child", "whoami", _pid)
    child = await Child.start(runtime_settings, "serve", lease_ttl_s=30)
    try:
        dead_id = (await child.read_line()).split()[1]
        client = caller.client("Child", "whoami")
        await asyncio.wait_for(_until(lambda: len(client.instance_ids()) == 2, client), timeout=5)
        pid_of = {dead_id: child.proc.pid, live.instance_id: os.getpid()}
        # Round robin takes the instances in their listed order, one per call from its
        # first: the answers show it, and line the child up as the next pick.
        order = client.instance_ids()
        assert [await client.call(None, target="round_robin") for _ in order] == [pid_of[i] for i in order]
        if order[0] != dead_id:
            assert await client.call(None, target="round_robin") == os.getpid()
        (record,) = [r for r in await client.wait_for_instances() if r.instance_id == dead_id]

        child.proc.kill()
        await child.proc.wait()
        await _until_nobody_subscribes(runtime_settings.nats_server, record.subject)
        assert dead_id in client.instance_ids(), "the record should outlive the process (lease 30 s)"

        start = time.monotonic()
        assert await client.call(None, target="round_robin") == os.getpid()
        assert time.monotonic() - start < 5
        # Taken for dead though its record lives: the next calls go to the live instance.
        assert [await client.call(None, target="round_robin") for _ in range(3)] == [os.getpid()] * 3
        assert dead_id in client.instance_ids()
    finally:
        await child.kill()


async def test_clean_stop_leaves_the_list_at_once(make_runtime: MakeRuntime) -> None:
    server, caller = await make_runtime(), await make_runtime()
    served = await server.serve_endpoint("Short", "lived", count_to, request_type=Count)
    client = caller.client("Short", "lived")
    await client.wait_for_instances(timeout=5)
    await served.stop()
    deadline = time.monotonic() + 1.0
    while client.instance_ids() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert client.instance_ids() == []
    with pytest.raises(NoInstancesError):
        await client.call(Count(1))


async def test_per_call_timeout(make_runtime: MakeRuntime) -> None:
    rt = await make_runtime()
    finished = asyncio.Event()

    async def slow(payload: Any, ctx: RequestContext) -> AsyncGenerator[int, None]:
        try:
            await asyncio.sleep(30)
            yield 1
        finally:
            finished.set()

    await rt.serve_endpoint("Slow", "go", slow)
    start = time.monotonic()
    with pytest.raises(CallTimeoutError):
        await rt.client("Slow", "go").call(None, timeout=0.3)
    assert time.monotonic() - start < 2
    await asyncio.wait_for(finished.wait(), timeout=5)


async def _until(predicate: Callable[[], bool], client: Any) -> None:
    await client.wait_for_instances(timeout=5)  # starts the client's instance watch
    while not predicate():
        await asyncio.sleep(0.02)


async def _reply_frames(runtime: Runtime, service: str, endpoint: str, payload: Any) -> list[bytes]:
    """The raw NATS messages one call gets back, up to the one that ends the stream."""
    record = next(iter(await runtime.client(service, endpoint).wait_for_instances(timeout=5)))
    nc = await nats.connect(runtime.settings.nats_server)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(record.subject, wire.encode_request("raw-call", payload), reply=inbox)
        frames: list[bytes] = []
        while not frames or frames[-1][0] not in (wire.FRAME_LAST, wire.FRAME_END, wire.FRAME_ERROR):
            frames.append((await sub.next_msg(timeout=5)).data)
        return frames
    finally:
        await nc.close()


async def test_items_ready_together_travel_in_one_frame(make_runtime: MakeRuntime) -> None:
    """The wire contract (docs/internals.md): a unary reply is one message, and items the
    handler yields without pausing share a frame; a pause starts a new one."""
    rt = await make_runtime()

    async def paused(payload: Any, ctx: RequestContext) -> AsyncGenerator[int, None]:
        yield 1
        yield 2
        await asyncio.sleep(0.05)
        yield 3

    await rt.serve_endpoint("Counter", "count", count_to, request_type=Count)
    await rt.serve_endpoint("Paused", "go", paused)

    unary = await _reply_frames(rt, "Counter", "count", Count(1))
    assert [frame[:1] for frame in unary] == [b"L"]
    assert msgspec.msgpack.decode(unary[0][1:], type=list[Item]) == [Item(0, "item 0")]

    streamed = await _reply_frames(rt, "Paused", "go", None)
    assert [frame[:1] for frame in streamed] == [b"B", b"L"]
    assert [msgspec.msgpack.decode(frame[1:]) for frame in streamed] == [[1, 2], [3]]
    assert [item async for item in rt.client("Paused", "go").stream(None)] == [1, 2, 3]


async def test_a_long_burst_is_split_below_the_message_size_limit(make_runtime: MakeRuntime) -> None:
    rt = await make_runtime()
    text = "x" * 10_000

    async def burst(payload: Any, ctx: RequestContext) -> AsyncGenerator[Item, None]:
        for i in range(300):  # 3 MB without a pause: three times NATS's default message limit
            yield Item(i, text)

    await rt.serve_endpoint("Burst", "go", burst)
    items = [item async for item in rt.client("Burst", "go").stream(None, response_type=Item)]
    assert [item.index for item in items] == list(range(300)) and all(item.text == text for item in items)
