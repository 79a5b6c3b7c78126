"""`PlacementPublisher` sends the placement events of a window as one message: the first
event arms the flush, those that come meanwhile join it, and none is lost or reordered."""

from __future__ import annotations

import asyncio

from app.protocol import PlacementEvent
from app.router.placements import PLACEMENT_WINDOW_S, PlacementPublisher

# Long enough that a slow, shared test machine still runs a few loop turns inside it.
WINDOW_S = 0.2


def event(i: int) -> PlacementEvent:
    return PlacementEvent(router_id="r1", request_id=f"q{i}", worker_id="w1", kind="routed")


class Sent:
    def __init__(self) -> None:
        self.messages: list[list[PlacementEvent]] = []

    async def __call__(self, events: list[PlacementEvent]) -> None:
        self.messages.append(events)


def test_the_window_is_short_against_a_requests_life() -> None:
    assert 0 < PLACEMENT_WINDOW_S <= 0.01


async def test_events_within_the_window_go_in_one_message() -> None:
    sent = Sent()
    publisher = PlacementPublisher(sent, window_s=WINDOW_S)
    publisher.publish(event(0))
    await asyncio.sleep(0)
    publisher.publish(event(1))
    await asyncio.sleep(0.01)  # several loop turns, still inside the window
    publisher.publish(event(2))
    assert sent.messages == []
    await asyncio.sleep(WINDOW_S * 1.5)
    assert sent.messages == [[event(0), event(1), event(2)]]


async def test_an_event_after_a_flush_starts_another_message() -> None:
    sent = Sent()
    publisher = PlacementPublisher(sent, window_s=0.01)
    publisher.publish(event(0))
    await asyncio.sleep(0.05)
    publisher.publish(event(1))
    publisher.publish(event(2))
    await asyncio.sleep(0.05)
    assert sent.messages == [[event(0)], [event(1), event(2)]]


async def test_no_event_is_lost_or_reordered_and_close_sends_what_is_pending() -> None:
    sent = Sent()
    publisher = PlacementPublisher(sent, window_s=0.005)
    for i in range(40):
        publisher.publish(event(i))
        if i % 7 == 0:
            await asyncio.sleep(0.003)
    await publisher.close()  # the last window's events go now, not in 5 ms
    assert [e for message in sent.messages for e in message] == [event(i) for i in range(40)]
    assert 1 < len(sent.messages) < 40


async def test_a_failed_send_is_logged_and_later_events_still_go() -> None:
    messages: list[list[PlacementEvent]] = []

    async def flaky(events: list[PlacementEvent]) -> None:
        messages.append(events)
        if len(messages) == 1:
            raise ConnectionError("NATS away")

    publisher = PlacementPublisher(flaky, window_s=0.005)
    publisher.publish(event(0))
    await asyncio.sleep(0.03)
    publisher.publish(event(1))
    await publisher.close()
    assert messages == [[event(0)], [event(1)]]
