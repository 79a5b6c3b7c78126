"""A separate process for fault tests: it connects a Runtime from the environment
(NATS_SERVER, ETCD_ENDPOINTS, TANDEM_NAMESPACE, TANDEM_LEASE_TTL_S) and then either

  serve             serves `Child/whoami` (yields its pid) and `Child/ticks` (yields
                    forever), then prints `ready <instance_id>`
  consume QUEUE     pulls one job from QUEUE, prints `got <job>` and never acks it
  stream S E        calls endpoint E of service S as a stream, prints `streaming` at its
                    first item, and reads no more

then waits to be killed.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncGenerator
from typing import Any

from app.runtime import RequestContext, Runtime


async def whoami(payload: Any, ctx: RequestContext) -> AsyncGenerator[int, None]:
    yield os.getpid()


async def ticks(payload: Any, ctx: RequestContext) -> AsyncGenerator[int, None]:
    tick = 0
    while True:
        yield tick
        tick += 1
        await asyncio.sleep(0.05)


async def main(mode: str, args: list[str]) -> None:
    runtime = await Runtime.connect()
    if mode == "serve":
        await runtime.serve_endpoint("Child", "whoami", whoami)
        await runtime.serve_endpoint("Child", "ticks", ticks)
        sys.stdout.write(f"ready {runtime.instance_id}\n")
    elif mode == "consume":
        queue = await runtime.work_queue(args[0], ack_wait_s=float(args[1]))
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        job = None
        while job is None:
            job = await queue.pull(timeout=1.0)
        sys.stdout.write(f"got {job.data}\n")
    elif mode == "stream":
        stream = runtime.client(args[0], args[1]).stream({})
        await anext(stream)
        sys.stdout.write("streaming\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
