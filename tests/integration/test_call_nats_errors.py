"""A call NATS refuses to send reaches the client as a 503 that names NATS, on a real server.

Before, the caller's NATS error escaped the call unwrapped and the Frontend answered 500
"internal error"; then a 503 whose message named only the exception's class.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import pytest

from app.openai.errors import to_client_error
from app.runtime import Runtime
from app.runtime.errors import NatsUnavailableError

MakeRuntime = Callable[..., Awaitable[Runtime]]


async def _echo(payload: Any, _ctx: Any) -> AsyncGenerator[Any, None]:
    yield payload


async def test_a_call_nats_refuses_is_a_503_service_unavailable_naming_nats(make_runtime: MakeRuntime) -> None:
    server, caller = await make_runtime(), await make_runtime()
    await server.serve_endpoint("Echo", "echo", _echo)
    client = caller.client("Echo", "echo")
    assert await client.call("before") == "before"
    await caller._nc.close()
    with pytest.raises(NatsUnavailableError) as caught:
        await client.call("after")
    answer = to_client_error(caught.value)  # what the Frontend answers with it
    assert (answer.status, answer.error_type, answer.code) == (503, "service_unavailable_error", "service_unavailable")
    assert "NATS" in answer.message and "Echo/echo" in answer.message, answer.message
    assert answer.retry_after_s == 1
