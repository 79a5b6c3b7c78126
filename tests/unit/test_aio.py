"""end_on_exit: a background loop that ends on its own takes its process down, a cancel does not."""

from __future__ import annotations

import asyncio
import functools

from prometheus_client import CollectorRegistry

from app.aio import cancel_and_wait, end_on_exit
from app.disagg.prefill import PrefillJobs


async def _settle() -> None:
    # Done-callbacks run on the loop's next turn.
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_loop_that_raises_fails_its_process_naming_the_task_and_the_error() -> None:
    reasons: list[str] = []

    async def loop() -> None:
        raise RuntimeError("the reporter broke")

    task = end_on_exit(asyncio.create_task(loop(), name="load-reports"), reasons.append)
    await asyncio.gather(task, return_exceptions=True)
    await _settle()
    assert len(reasons) == 1
    assert "load-reports" in reasons[0] and "the reporter broke" in reasons[0]


async def test_a_loop_that_returns_fails_its_process_too() -> None:
    reasons: list[str] = []

    async def loop() -> None:
        return None

    await end_on_exit(asyncio.create_task(loop(), name="watchdog"), reasons.append)
    await _settle()
    assert reasons == ["background task watchdog ended"]


async def test_a_cancelled_loop_is_a_stop_not_a_failure() -> None:
    reasons: list[str] = []
    task = end_on_exit(asyncio.create_task(asyncio.sleep(60), name="pulls"), reasons.append)
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    await _settle()
    assert reasons == []


class _Bug(BaseException):
    """What no puller contains: its `except Exception` lets it through, as a bug would escape."""


class _BrokenQueue:
    stream = "prefill"

    async def pull(self, timeout: float, job_type: type) -> None:
        await asyncio.sleep(0.01)
        raise _Bug("a bug in the puller")


class _Runtime:
    async def work_queue(self, name: str, ack_wait_s: float) -> _BrokenQueue:
        return _BrokenQueue()


async def test_a_prefill_worker_whose_pullers_die_leaves_instead_of_idling_registered() -> None:
    # Before: the worker stayed registered with no puller, and decode workers queued jobs
    # that it never took, each request waiting out remote-prefill-timeout-s.
    reasons: list[str] = []

    async def generate(request):  # never reached: no job is pulled
        raise AssertionError("no job expected")
        yield

    jobs = PrefillJobs(_Runtime(), generate, 2, CollectorRegistry(), reasons.append)  # type: ignore[arg-type]
    await jobs.start()
    for _ in range(100):
        if len(reasons) == 2:
            break
        await asyncio.sleep(0.01)
    assert jobs.live_pullers() == 0
    assert len(reasons) == 2 and all("prefill-puller" in reason for reason in reasons)
    await jobs.close()


async def test_an_end_the_owner_expects_is_not_a_failure_and_any_other_is() -> None:
    reasons: list[str] = []
    for stop_asked in (True, False):
        task = asyncio.create_task(asyncio.sleep(0), name="uvicorn")
        await end_on_exit(task, reasons.append, unless=functools.partial(bool, stop_asked))
        await _settle()
    assert reasons == ["background task uvicorn ended"]
