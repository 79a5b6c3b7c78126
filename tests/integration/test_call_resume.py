"""A call whose NATS connection drops mid-stream resumes from the frame it is due (wire.py),
on real NATS restarted under it: every item exactly once, in order, as in an unbroken run;
a callee that no longer has the frames makes the caller raise ConnectionLostError, as before
resumes existed (a request pipeline moves such a stream to another worker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import pytest

from app.infra import NatsServer
from app.runtime import ConnectionLostError, RequestContext, Runtime, wire

MakeRuntime = Callable[..., Awaitable[Runtime]]

# How long NATS stays away: well past the silence the caller would take for a dead callee
# (5 heartbeats), so that the resume, not luck, carries the call across.
DOWN_S = 6.0


async def _chunks(payload: Any, ctx: RequestContext) -> AsyncGenerator[dict[str, Any], None]:
    """`payload["count"]` items, three to a turn of the event loop (batch frames) with
    `payload["pause_s"]` between turns, each `payload["size"]` bytes of filler."""
    filler = "x" * payload.get("size", 8)
    for n in range(payload["count"]):
        yield {"n": n, "text": f"{n}:{filler}"}
        if n % 3 == 2:
            await asyncio.sleep(payload["pause_s"])


async def _read_all(stream: AsyncGenerator[Any, None], timeout: float) -> list[Any]:
    async with asyncio.timeout(timeout):
        return [item async for item in stream]


async def _read_across_a_restart(
    client: Any, payload: dict[str, Any], nats_server: NatsServer, callee: Runtime, read_before: int
) -> list[Any]:
    """Read `read_before` items, take NATS away for DOWN_S, then read the rest. While NATS
    is away the callee's reconnect buffer refuses every frame (as a full one does): what
    its handler streams meanwhile can only reach the caller through the resume's replay."""
    stream = client.stream(payload)
    items = [await anext(stream) for _ in range(read_before)]
    await asyncio.to_thread(nats_server.stop)
    pending_size = callee._nc._max_pending_size
    callee._nc._max_pending_size = 1
    try:
        await asyncio.sleep(DOWN_S)
    finally:
        await asyncio.to_thread(nats_server.start)
        callee._nc._max_pending_size = pending_size
    items += await _read_all(stream, timeout=30)
    return items


@pytest.mark.parametrize(
    ("case", "payload"),
    [
        # The handler streams on through the outage and after it.
        ("running", {"count": 1200, "pause_s": 0.03}),
        # The handler ends while NATS is away: its last frames wait in its reconnect buffer,
        # the ended call's replay is kept for the resume.
        ("ended", {"count": 90, "pause_s": 0.03}),
    ],
)
async def test_a_stream_across_a_nats_restart_gets_every_item_once_in_order(
    make_runtime: MakeRuntime, nats_server: NatsServer, case: str, payload: dict[str, Any]
) -> None:
    server, caller = await make_runtime(), await make_runtime()
    await server.serve_endpoint("Chunks", "go", _chunks)
    client = caller.client("Chunks", "go")
    unbroken = await _read_all(client.stream(payload), timeout=60)
    assert [item["n"] for item in unbroken] == list(range(payload["count"]))

    items = await _read_across_a_restart(client, payload, nats_server, server, read_before=10)

    assert items == unbroken


async def test_a_callee_that_no_longer_has_the_frames_makes_the_call_fail_as_lost(
    make_runtime: MakeRuntime, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The callee's replay buffer overflows during the outage (its cap lowered to a few
    frames): it answers that it cannot resume, and the caller raises what it raised before."""
    monkeypatch.setattr(wire, "REPLAY_MAX_FRAMES", 8)
    server, caller = await make_runtime(), await make_runtime()
    await server.serve_endpoint("Chunks", "go", _chunks)
    with pytest.raises(ConnectionLostError, match="no longer has the call's frames") as caught:
        await _read_across_a_restart(
            caller.client("Chunks", "go"), {"count": 1200, "pause_s": 0.03}, nats_server, server, read_before=10
        )
    assert not caught.value.worker_at_fault  # a request pipeline moves the stream on
