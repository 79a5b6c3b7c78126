"""Waiting for what a test started to serve: an instance in discovery, a health endpoint.
Each wait gives up with an AssertionError that carries the logs of what was started."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable

from app.runtime import Runtime
from app.settings import RuntimeSettings


async def wait_for_an_instance(
    settings: RuntimeSettings, service: str, endpoint: str, timeout: float, logs: Callable[[], str]
) -> None:
    """Until an instance of `service`'s `endpoint` is registered."""
    async with await Runtime.connect(settings) as runtime:
        watch = await runtime.discovery.watch_instances(service, endpoint)
        try:
            await watch.wait_until(lambda items: len(items) >= 1, timeout)
        except TimeoutError:
            raise AssertionError(f"no {service} registered after {timeout}s\n{logs()}") from None
        finally:
            await watch.close()


def answers_200(url: str, timeout: float = 1.0) -> bool:
    """A GET of `url` answers 200 (False where nothing answers, or something else does)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


async def wait_healthy(url: str, timeout: float, assert_running: Callable[[], None], logs: Callable[[], str]) -> None:
    """Until `url` answers 200, while `assert_running` finds what serves it still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert_running()
        if await asyncio.to_thread(answers_200, url, 2):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {timeout}s\n{logs()}")
