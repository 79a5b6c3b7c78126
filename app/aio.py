"""Small asyncio helpers shared across the package."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has really stopped (its `finally` ran)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def end_on_exit(
    task: asyncio.Task[Any], fail: Callable[[str], None], unless: Callable[[], bool] = lambda: False
) -> asyncio.Task[Any]:
    """Make `task` essential: if it ends by anything but a cancel, `fail` says why.

    For the loops a process is worthless without (a PrefillWorker's job pullers, a worker's
    load reports, the engine watchdog): one that ended on an unexpected error would leave the
    process registered and answering while it silently does none of that work. `fail`
    (ServiceContext.fail) takes the process out of routing and ends it non-zero, so that
    supervisord starts a fresh one.

    `unless()`: true when the end is expected, for a task that ends normally when asked to
    (uvicorn's `serve()` returns at shutdown).
    """

    def check(done: asyncio.Task[Any]) -> None:
        if done.cancelled() or unless():
            return
        exc = done.exception()
        reason = f"background task {done.get_name()} ended" + (f": {exc!r}" if exc is not None else "")
        log.critical("%s; this process leaves and is restarted", reason, exc_info=exc)
        fail(reason)

    task.add_done_callback(check)
    return task
