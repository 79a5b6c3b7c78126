"""`DisaggPolicy`: where a request's prefill runs, from the worker's switches and the live
thresholds (app/disagg/tunables.py)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Literal

from app.disagg.tunables import MAX_LOCAL_PREFILL_LENGTH, MAX_PREFILL_QUEUE_SIZE
from app.protocol import PreprocessedRequest
from app.tunables import LiveTunables, TunablesSource

log = logging.getLogger(__name__)

Decision = Literal["local", "remote", "fallback"]


class DisaggPolicy:
    """Where a request's prefill runs: the config's switches, the live thresholds."""

    def __init__(self, conditional: bool, max_local_prefill_length: int, max_prefill_queue_size: int) -> None:
        self._conditional = conditional
        self._thresholds = LiveTunables(
            {
                MAX_LOCAL_PREFILL_LENGTH: max_local_prefill_length,
                MAX_PREFILL_QUEUE_SIZE: max_prefill_queue_size,
            }
        )
        self.decisions: Counter[str] = Counter()

    async def start(self, tunables: TunablesSource) -> None:
        await self._thresholds.start(tunables)

    async def close(self) -> None:
        await self._thresholds.close()

    async def prefill_remotely(self, request: PreprocessedRequest, queue_depth: Callable[[], Awaitable[int]]) -> bool:
        """True if this request's prefill should go to the queue.

        `queue_depth` is asked only when the length alone sends the request remote (it
        costs a JetStream round trip). vLLM has no cheap prefix-cache lookup, so the
        whole prompt counts as uncached.
        """
        if not self._conditional:
            return True
        uncached = len(request.token_ids)
        if uncached <= self._thresholds.get(MAX_LOCAL_PREFILL_LENGTH):
            return False
        return await queue_depth() < self._thresholds.get(MAX_PREFILL_QUEUE_SIZE)

    def count(self, decision: Decision, request_id: str, detail: str) -> None:
        self.decisions[decision] += 1
        log.debug("request %s: prefill %s (%s)", request_id, decision, detail)
