"""The one engine protocol that VllmWorker and PrefillWorker drive.

Implementations: `vllm` (vLLM's AsyncLLM) and `mocker` (a simulated vLLM-like engine).
Each is registered in `app.engines.ENGINES` under its config name.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.errors import WorkerUnavailableError
from app.protocol import EngineOutput, KvEventBatch, ModelInfo, PreprocessedRequest

KvEventSink = Callable[[KvEventBatch], None]


@dataclass(slots=True, eq=False)
class EngineStats:
    """A snapshot of the engine's scheduler, for load reports and metrics."""

    running: int = 0
    waiting: int = 0
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_queries: int = 0
    # Disaggregated decode: prompt tokens whose KV a KV connector pulled from another
    # engine instead of computing it, and the bytes it moved (counters since start).
    external_kv_prompt_tokens: int = 0
    kv_transfer_bytes: int = 0
    # KV pulls that failed (transfer or handshake; the request was recomputed under
    # vLLM's "recompute" policy), and prefilled KV that expired before a decode pulled it.
    kv_transfer_failures: int = 0
    kv_expired_requests: int = 0


@dataclass(frozen=True, slots=True)
class EngineProgress:
    """Whether the engine is getting on with its work, for the stall check
    (app/engines/stall.py): one look, compared with the one before."""

    pending: int  # requests that wait on the engine's steps (admitted, not finished)
    steps: int  # engine steps completed since start; a healthy engine with work adds to it


@dataclass(frozen=True)
class EngineProcess:
    """The process an engine is about to start in, for its `prepare`: where it runs, and
    what the worker's section says about the process (every worker takes these keys; an
    engine reads those it uses)."""

    replica: int  # index among this node's processes of the service
    advertised_host: str  # the address this process advertises to other nodes (app.node)
    cpu_omp_threads_bind: Sequence[str] = ()  # OpenMP cores by replica index
    nixl_side_channel_port: int = 0  # replica 0's; 0 picks a free port
    ray_address: str | None = None  # the Ray head, where the engine is larger than its node
    ray_wait_timeout_s: float = 600.0
    # Where an engine that runs processes of its own notes them, so that they never outlive
    # this one (app.launch.leftovers); one file per service replica and host.
    leftovers_record: Path | None = None


class Engine(abc.ABC):
    """An LLM engine behind a worker.

    Lifecycle: `await prepare()` and `await start()` once, then any number of concurrent
    `generate()` streams, then `await stop()`. The worker that owns the engine publishes
    what `on_kv_events` delivers and what `stats()` returns; the engine itself knows
    nothing of NATS or etcd.
    """

    async def prepare(self, process: EngineProcess) -> None:  # noqa: B027 - the mocker needs nothing
        """Make this process ready for the engine, before `start`: the one place where an
        engine hands settings to its libraries through the environment (vLLM's and Ray's
        variables), and where it waits for what it needs outside this process. Nothing to
        do by default (the mocker)."""

    @abc.abstractmethod
    async def start(self, worker_id: str, on_kv_events: KvEventSink | None = None) -> ModelInfo:
        """Load the model; return what the fleet should know about it."""

    @abc.abstractmethod
    def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        """Stream outputs for one request. Closing or cancelling the iterator aborts
        the request inside the engine and frees its KV blocks."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current scheduler state (cheap; called for every load report)."""

    def dead_reason(self) -> str | None:
        """Why the engine can serve nothing more (its core process died, ...), or None while it can.

        Cheap: the worker polls it. A dead engine stays dead; its worker leaves routing and
        exits so that supervisord starts a fresh one.
        """
        return None

    @abc.abstractmethod
    def progress(self) -> EngineProgress:
        """Its pending requests and its step count (cheap; the worker polls it). An engine
        with pending requests whose step count stays put for `engine-stall-timeout-s` is
        hung: its worker leaves as for a dead one (app/engines/stall.py)."""

    def nixl_side_channel(self) -> str:
        """HOST:PORT where this engine listens for NIXL handshakes, once prepared ("": it
        uses no NIXL connector): what a decode engine dials to pull a prefill's KV."""
        return ""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release the engine. Callers drain in-flight requests before calling it."""


class EngineDeadError(WorkerUnavailableError):
    """The engine died under a request: the request can go to another worker (503, not 500)."""
