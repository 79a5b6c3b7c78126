"""`mocker`: a simulated vLLM-like engine, for routing work and benchmarks without GPUs.

One asyncio task per engine runs a continuous-batching scheduler shaped like vLLM v1's:
a waiting queue and a running set, paged KV blocks with prefix caching
(`app.engines.mocker_kv`), chunked prefill bounded by `max_num_batched_tokens`, and
recompute preemption when the KV cache runs out. Each step sleeps for the timing
model's duration divided by `speedup_ratio`, then every scheduled request advances;
a request whose prompt is fully computed gets one token per step. Steps shorter than a
millisecond (a large `speedup_ratio`) are slept in bulk: their tokens then reach the
caller several to an output, as they would from an engine that steps faster than its
caller reads.

Tokens come from a deterministic generator (a hash of the whole context so far, and the
request's seed), so the same prompt always yields the same text, and a request continued
from any point of its output (request migration) yields the rest of it. Sampling fields that shape a distribution
change nothing (there is none); `logit_bias`, `allowed_token_ids` and `bad_words` steer
the generator as they steer vLLM (`app.engines.mocker_sampling`), structured outputs
(`response_format`, `structured_outputs`, forced tool calls) through vLLM's xgrammar
backend (`app.engines.mocker_grammar`: only tokens the grammar allows, and the request
ends where the grammar does), and stop tokens, `min_tokens`, `ignore_eos` and `max_tokens`
end a request as in vLLM. KV events match
what vLLM publishes (`BlockStored` when blocks fill, `BlockRemoved` on eviction), with
engine hashes that deliberately differ from the router's so that the router can't
depend on them.

Timing model, per step (milliseconds, before `speedup_ratio`):

    prefill_base_ms + prefill_ms_per_token * prefill tokens          (if any prefill)
  + decode_base_ms + decode_ms_per_seq * decoding requests
                   + decode_ms_per_kv_block * their KV blocks        (if any decode)

A step that computes a single token (a decode, or a prompt's last token alone) costs
a decode slot, not a prefill: it is a decode-shaped forward pass.

Disaggregated serving, the two roles vLLM's NixlConnector gives an engine:

* prefill: a request with `kv_transfer_params={"do_remote_decode": true}` (PrefillWorker
  sends it with max_tokens 1) is prefilled as usual and finishes with one token, reason
  "length". Its KV blocks are then held, not freed, and its last output carries
  `kv_transfer_params` naming them (`_prefill_params`). A mocker in another process
  cannot tell this one that it has pulled the KV, so the blocks are held for
  `kv_lease_s` (simulated seconds), standing in for vLLM's read notification.
* decode: a request carrying such params (`do_remote_prefill: true`) takes its prompt's
  KV from the prefill engine instead of computing it: it reserves the blocks, waits a
  transfer time, then joins the running set with all but the last prompt token
  computed (vLLM recomputes that one to produce the first token). The transfer time is
  the bytes of the prompt tokens not already in its own prefix cache,
  `kv_bytes_per_token` each, over `kv_transfer_gb_per_s`, divided by `speedup_ratio`.
  Transfers run beside the batch; they take KV blocks but no step time. A decode
  request preempted later recomputes its prompt locally. With
  `kv_transfer_failure_rate` (a fault knob) that share of pulls fails after its transfer
  time and the request recomputes its prompt locally, as vLLM does under the
  `kv_load_failure_policy: recompute` Tandem sets by default (app/engines/vllm.py).

A hung engine, the other fault knob: once the file `fault_hang_file` names exists (looked
for every `HANG_FILE_POLL_S` while the scheduler runs, and at its next wake-up while it
idles), the scheduler completes no step more and its requests stay unfinished, as under a
vLLM engine core that is SIGSTOPped or stuck in a CUDA call, while the worker process
around it goes on. `{worker_id}` in the path stands for this engine's worker, so that one
worker of several hangs; its successor has another id.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from array import array
from collections import deque
from collections.abc import AsyncGenerator
from hashlib import blake2b
from typing import Any

import pydantic
from tokenizers import Tokenizer

from app.aio import cancel_and_wait
from app.engines.base import Engine, EngineProgress, EngineStats, KvEventSink
from app.engines.mocker_grammar import Grammars, RequestGrammar
from app.engines.mocker_kv import BlockPool
from app.engines.mocker_sampling import TokenChoice, load_tokenizer, token_choice
from app.errors import InvalidRequestError
from app.protocol import EngineOutput, KvEventBatch, ModelInfo, PreprocessedRequest, TokenLogprob
from app.router.hashing import block_hashes

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
# Simulated step time shorter than this is owed rather than slept (see MockerEngine._run).
MIN_SLEEP_S = 0.001
# The scheduler yields to the event loop at least this often while it runs ahead of its owed time.
MAX_AWAKE_S = 0.002
# How often a mocker with `fault_hang_file` looks for that file.
HANG_FILE_POLL_S = 0.1


class MockerConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    model: str = "mocker"  # also where the Processor reads the tokenizer from
    served_model_name: str | None = None
    block_size: int = pydantic.Field(default=16, ge=1)
    num_gpu_blocks: int = pydantic.Field(default=16384, ge=1)  # KV capacity
    max_num_seqs: int = pydantic.Field(default=256, ge=1)
    max_num_batched_tokens: int = pydantic.Field(default=8192, ge=1)
    max_model_len: int = pydantic.Field(default=8192, ge=2)
    enable_prefix_caching: bool = True
    speedup_ratio: float = pydantic.Field(default=1.0, gt=0)
    prefill_base_ms: float = pydantic.Field(default=5.0, ge=0)
    prefill_ms_per_token: float = pydantic.Field(default=0.05, ge=0)
    decode_base_ms: float = pydantic.Field(default=8.0, ge=0)
    decode_ms_per_seq: float = pydantic.Field(default=0.05, ge=0)
    decode_ms_per_kv_block: float = pydantic.Field(default=0.002, ge=0)
    seed: int = 0
    vocab_size: int = pydantic.Field(default=32000, ge=2)
    eos_token_id: int = 2
    # An 8B Llama-3-like model in bf16: 2 (K and V) x 32 layers x 8 KV heads x 128 dims x 2 bytes.
    kv_bytes_per_token: int = pydantic.Field(default=131072, ge=1)
    # The prefill -> decode link, in gigabytes (1e9 bytes) per second: ~25 GB/s is a
    # 200 Gb/s RDMA NIC; NVLink is tens of times more.
    kv_transfer_gb_per_s: float = pydantic.Field(default=25.0, gt=0)
    # Prefill role: how long handed-off KV is held. vLLM frees it when the decode engine
    # says it has read it, a transfer time and a round trip after the answer.
    kv_lease_s: float = pydantic.Field(default=0.5, gt=0)
    # Decode role, a fault to test with: the share of KV pulls that fail (then recomputed).
    kv_transfer_failure_rate: float = pydantic.Field(default=0.0, ge=0, le=1)
    # A fault to test with: the engine hangs once this file exists ({worker_id}: this engine's).
    fault_hang_file: str | None = None

    @pydantic.model_validator(mode="after")
    def _fits(self) -> MockerConfig:
        capacity = self.num_gpu_blocks * self.block_size
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len {self.max_model_len} does not fit in the KV cache "
                f"({self.num_gpu_blocks} blocks x {self.block_size} tokens = {capacity})"
            )
        return self


class _Request:
    __slots__ = (
        "id",
        "tokens",
        "num_prompt",
        "num_output",
        "stop",
        "want_logprobs",
        "seed",
        "blocks",
        "hashes",
        "num_cached_blocks",
        "num_computed",
        "num_cached_tokens",
        "pending",
        "pending_logprobs",
        "finish_reason",
        "wake",
        "hand_off",
        "remote_tokens",
        "kv_transfer_params",
        "choice",
        "grammar",
        "context",
    )

    def __init__(
        self, request: PreprocessedRequest, seed: int, choice: TokenChoice | None, grammar: RequestGrammar | None
    ) -> None:
        self.id = request.request_id
        self.tokens = list(request.token_ids)
        self.num_prompt = len(self.tokens)
        self.num_output = 0
        self.stop = request.stop
        self.want_logprobs = request.sampling.logprobs
        self.seed = seed
        self.blocks: list[int] = []
        self.hashes: list[int] = []  # engine hashes of the full blocks hashed so far
        self.num_cached_blocks = 0  # leading blocks registered in the prefix cache
        self.num_computed = 0
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first admission
        self.pending: list[int] = []  # generated, not yet handed to the caller
        self.pending_logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.wake = asyncio.Event()
        self.hand_off = False  # prefill role: keep the KV for a decode engine when done
        self.remote_tokens = 0  # decode role: prompt tokens whose KV comes from a prefill engine
        self.kv_transfer_params: dict[str, Any] | None = None  # prefill role: the answer
        self.choice = choice  # the request's constraints on its tokens, if any
        self.grammar = grammar  # its structured output's matcher, if any
        # The "model" reads its whole context: a hash over every token so far, fed as they
        # come. A request continued elsewhere (the prompt plus the tokens already made, as
        # request migration sends it) so goes on exactly as it would have.
        self.context = blake2b(array("i", self.tokens).tobytes(), digest_size=8)


class MockerEngine(Engine):
    ARG_NAMES: frozenset[str] = frozenset(MockerConfig.model_fields)

    def __init__(self, config: MockerConfig) -> None:
        self.config = config
        self._pool = BlockPool(config.num_gpu_blocks, config.enable_prefix_caching)
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self._transfers: dict[str, asyncio.TimerHandle] = {}  # decode role: KV pulls under way
        self._held: dict[str, tuple[list[int], asyncio.TimerHandle]] = {}  # prefill role: leased KV
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._steps = 0
        # The hang fault: its file (once started), when the scheduler next looks for it.
        self._hang_file: str | None = None
        self._hang_look_at = 0.0
        self._worker_id = ""
        self._on_kv_events: KvEventSink | None = None
        self._event_seq = 0
        # A per-engine root for the engine hashes: like vLLM's random hash seed, it makes
        # them differ from the router's and between engines.
        self._hash_root = int.from_bytes(blake2b(f"mocker-{config.seed}".encode(), digest_size=8).digest(), "little")
        self._prefix_hits = 0
        self._prefix_queries = 0
        # Decode role: prompt tokens pulled, their bytes, and the pulls that failed.
        self._pulled_tokens = 0
        self._pulled_bytes = 0
        self._failed_pulls = 0
        self._faults = random.Random(config.seed)
        # For bad_words alone: loaded at the first request that has some.
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_loaded = False
        self._grammars = Grammars(config.model, config.vocab_size)  # loads at the first constrained request

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> MockerEngine:
        """Build from a worker's config section (snake_case or kebab-case keys)."""
        raw = {str(key).replace("-", "_"): value for key, value in section.items()}
        try:
            return cls(MockerConfig.model_validate(raw))
        except pydantic.ValidationError as exc:
            problems = []
            for error in exc.errors():
                key = ".".join(str(part) for part in error["loc"]) or "config"
                if error["type"] == "extra_forbidden":
                    problems.append(f"unknown key {key!r}")
                else:
                    problems.append(f"{key}: {error['msg']}")
            raise ValueError("mocker engine: " + "; ".join(problems)) from None

    # --- Engine -------------------------------------------------------------------

    async def start(self, worker_id: str, on_kv_events: KvEventSink | None = None) -> ModelInfo:
        self._worker_id = worker_id
        self._on_kv_events = on_kv_events
        self._task = asyncio.create_task(self._run(), name=f"mocker-{worker_id}")
        config = self.config
        if config.fault_hang_file is not None:
            self._hang_file = config.fault_hang_file.replace("{worker_id}", worker_id)
        return ModelInfo(
            name=config.served_model_name or config.model,
            max_model_len=config.max_model_len,
            block_size=config.block_size,
            model_path=config.model,
        )

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for request in list(self._requests.values()):
            self._finish(request, "abort")
        for request_id in list(self._held):
            self._drop_held(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_used_blocks=self._pool.num_used(),
            kv_total_blocks=self._pool.num_blocks,
            prefix_cache_hits=self._prefix_hits,
            prefix_cache_queries=self._prefix_queries,
            external_kv_prompt_tokens=self._pulled_tokens,
            kv_transfer_bytes=self._pulled_bytes,
            kv_transfer_failures=self._failed_pulls,
        )

    def progress(self) -> EngineProgress:
        # Requests in a KV transfer wait on the link, not on a step: the scheduler may idle.
        return EngineProgress(pending=len(self._waiting) + len(self._running), steps=self._steps)

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        if request.sampling.bad_words and not self._tokenizer_loaded:
            self._tokenizer = await asyncio.to_thread(load_tokenizer, self.config.model)
            self._tokenizer_loaded = True
        grammar = await self._grammars.grammar_for(request) if request.sampling.structured is not None else None
        req = self._admit(request, grammar)
        first = True
        try:
            while True:
                await req.wake.wait()
                req.wake.clear()
                output = EngineOutput(token_ids=req.pending, finish_reason=req.finish_reason)
                if req.want_logprobs is not None:
                    output.logprobs = req.pending_logprobs
                    output.top_logprobs = [
                        self._top_logprobs(req, t, lp) for t, lp in zip(req.pending, req.pending_logprobs, strict=True)
                    ]
                    req.pending_logprobs = []
                req.pending = []
                if req.finish_reason is not None and req.kv_transfer_params is not None:
                    output.kv_transfer_params = req.kv_transfer_params
                if first:
                    first = False
                    output.num_prompt_tokens = req.num_prompt
                    output.num_cached_tokens = req.num_cached_tokens or 0
                    output.worker_id = self._worker_id
                yield output
                # The output's own reason, not the request's: while our caller held the
                # output the scheduler may have finished the request, and the tokens it made
                # since (with the finish) are for the next output.
                if output.finish_reason is not None:
                    return
        finally:
            if req.finish_reason is None:
                log.debug("request %s aborted by its caller", req.id)
                self._finish(req, "abort")

    def _admit(self, request: PreprocessedRequest, grammar: RequestGrammar | None) -> _Request:
        if self._task is None:
            raise RuntimeError("mocker engine not started")
        if not request.token_ids:
            raise InvalidRequestError(f"request {request.request_id}: empty prompt")
        if len(request.token_ids) >= self.config.max_model_len:
            raise InvalidRequestError(
                f"request {request.request_id}: prompt of {len(request.token_ids)} tokens leaves no room "
                f"under max_model_len {self.config.max_model_len}"
            )
        if request.stop.max_tokens < 1:
            raise InvalidRequestError(f"request {request.request_id}: max_tokens must be at least 1")
        if request.request_id in self._requests:
            raise InvalidRequestError(f"request {request.request_id} is already running")
        choice = token_choice(request.request_id, request.sampling, self.config.vocab_size, self._tokenizer)
        req = _Request(request, self._generation_seed(request), choice, grammar)
        if request.kv_transfer_params is not None:
            self._take_role(req, request.kv_transfer_params)
        self._requests[req.id] = req
        self._waiting.append(req)
        self._work.set()
        return req

    def _take_role(self, req: _Request, params: dict[str, Any]) -> None:
        if params.get("do_remote_decode"):
            req.hand_off = True
        elif params.get("do_remote_prefill") and "num_tokens" in params:
            if params["num_tokens"] != req.num_prompt:
                raise ValueError(
                    f"request {req.id}: kv_transfer_params hold {params['num_tokens']} tokens, "
                    f"the prompt has {req.num_prompt}"
                )
            req.remote_tokens = req.num_prompt - 1
        else:
            raise ValueError(f"request {req.id}: kv_transfer_params the mocker cannot serve: {params}")

    def _prefill_params(self, req: _Request, blocks: list[int]) -> dict[str, Any]:
        """What a prefill-role request answers, shaped like NixlConnector's params; a decode
        mocker reads `do_remote_prefill` and `num_tokens`, the rest names the held KV."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self._worker_id,
            "remote_request_id": req.id,
            "remote_block_ids": list(blocks),
            "remote_host": "mocker",
            "remote_port": 0,
            "num_tokens": req.num_prompt,
        }

    def transfer_seconds(self, num_tokens: int) -> float:
        """Wall time to pull `num_tokens` tokens' KV over the configured link."""
        config = self.config
        return num_tokens * config.kv_bytes_per_token / (config.kv_transfer_gb_per_s * 1e9) / config.speedup_ratio

    def _start_transfer(self, req: _Request) -> None:
        seconds = self.transfer_seconds(req.remote_tokens - req.num_computed)
        self._transfers[req.id] = asyncio.get_running_loop().call_later(seconds, self._transfer_done, req)

    def _transfer_done(self, req: _Request) -> None:
        del self._transfers[req.id]
        if self._faults.random() < self.config.kv_transfer_failure_rate:
            # Recompute: the request keeps its reserved blocks and its own prefix-cache hit,
            # and the scheduler computes the rest of its prompt as a (chunked) prefill.
            self._failed_pulls += 1
            log.warning("request %s: KV pull failed (fault knob); recomputing its prompt", req.id)
        else:
            pulled = req.remote_tokens - req.num_computed
            self._pulled_tokens += pulled
            self._pulled_bytes += pulled * self.config.kv_bytes_per_token
            req.num_computed = req.remote_tokens
        req.remote_tokens = 0  # were it preempted later, it recomputes locally
        self._cache_full_blocks(req)
        self._running.append(req)
        self._work.set()

    def _drop_held(self, request_id: str) -> None:
        blocks, lease = self._held.pop(request_id)
        lease.cancel()
        self._pool.free(blocks)
        self._work.set()  # the freed blocks may be what a waiting request needs

    # --- the scheduler loop ---------------------------------------------------------

    async def _run(self) -> None:
        # Simulated step time not slept yet. A step shorter than MIN_SLEEP_S is not slept
        # on its own: the time is owed and slept together with later steps' (the event
        # loop's timers have millisecond resolution anyway). So a fast mocker runs several
        # steps per wake-up of its requests, each of which then collects several tokens,
        # as a real engine's caller does when it reads less often than the engine steps.
        owed_s = 0.0
        awake_since = time.perf_counter()
        while True:
            if self._hangs_now():
                await asyncio.Future()  # until stop() cancels it
            if not self._running and not self._waiting:
                await self._idle()
                owed_s, awake_since = 0.0, time.perf_counter()
                continue
            scheduled = self._schedule()
            if not scheduled:
                # Nothing fits this step (e.g. max_num_seqs of requests all waiting on
                # blocks): wait for an arrival or an abort rather than spin.
                await self._idle()
                owed_s, awake_since = 0.0, time.perf_counter()
                continue
            owed_s += self._step_ms(scheduled) / 1000.0 / self.config.speedup_ratio
            if owed_s >= MIN_SLEEP_S:
                self._publish_kv_events()
                await asyncio.sleep(owed_s)
                owed_s, awake_since = 0.0, time.perf_counter()
            elif time.perf_counter() - awake_since >= MAX_AWAKE_S:
                # Running ahead, but arrivals, aborts and the worker's NATS traffic must
                # still be served.
                self._publish_kv_events()
                await asyncio.sleep(0)
                awake_since = time.perf_counter()
            self._advance(scheduled)
            self._steps += 1

    def _hangs_now(self) -> bool:
        """The hang fault: whether its file has come (looked for every HANG_FILE_POLL_S)."""
        if self._hang_file is None or time.monotonic() < self._hang_look_at:
            return False
        self._hang_look_at = time.monotonic() + HANG_FILE_POLL_S
        if not os.path.exists(self._hang_file):
            return False
        log.warning("worker %s: %s exists: the engine hangs (fault knob)", self._worker_id, self._hang_file)
        return True

    async def _idle(self) -> None:
        self._publish_kv_events()
        self._work.clear()
        await self._work.wait()

    def _schedule(self) -> list[tuple[_Request, int]]:
        """This step's batch: (request, tokens to compute). Running requests first, in
        admission order; the newest are preempted when blocks run out."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[_Request, int]] = []
        preempted = False
        index = 0
        while index < len(self._running) and budget > 0:
            req = self._running[index]
            count = min(len(req.tokens) - req.num_computed, budget)
            if self._reserve(req, req.num_computed + count):
                scheduled.append((req, count))
                budget -= count
                index += 1
                continue
            victim = self._running.pop()
            self._preempt(victim)
            preempted = True
        # After a preemption the cache is tight: admitting more would only thrash,
        # unless everything was preempted and the queue head must restart.
        while (
            (not preempted or not scheduled)
            and self._waiting
            and budget > 0
            and len(self._running) < self.config.max_num_seqs
        ):
            req = self._waiting[0]
            if not req.blocks:
                self._reuse_cached_prefix(req)
            if req.remote_tokens:
                if not self._reserve(req, req.remote_tokens):
                    self._release(req)
                    break
                self._waiting.popleft()
                self._start_transfer(req)
                continue
            count = min(len(req.tokens) - req.num_computed, budget)
            if not self._reserve(req, req.num_computed + count):
                self._release(req)  # don't sit on cached blocks while waiting
                break
            self._waiting.popleft()
            self._running.append(req)
            scheduled.append((req, count))
            budget -= count
        return scheduled

    def _reuse_cached_prefix(self, req: _Request) -> None:
        block_size = self.config.block_size
        # Like vLLM, the last prompt token is always computed, so a hit stops short of it.
        max_blocks = (len(req.tokens) - 1) // block_size
        self._extend_hashes(req, max_blocks)
        hit = self._pool.match_prefix(req.hashes[:max_blocks])
        self._pool.touch(hit)
        req.blocks = hit
        req.num_cached_blocks = len(hit)
        req.num_computed = len(hit) * block_size
        if req.num_cached_tokens is None:
            req.num_cached_tokens = req.num_computed
            self._prefix_queries += req.num_prompt
            self._prefix_hits += req.num_computed

    def _reserve(self, req: _Request, num_tokens: int) -> bool:
        needed = math.ceil(num_tokens / self.config.block_size) - len(req.blocks)
        if needed <= 0:
            return True
        fresh = self._pool.allocate(needed)
        if fresh is None:
            return False
        req.blocks.extend(fresh)
        return True

    def _preempt(self, req: _Request) -> None:
        """Recompute preemption: drop its KV and requeue it first in line."""
        log.debug("request %s preempted: out of KV blocks", req.id)
        self._release(req)
        self._waiting.appendleft(req)

    def _release(self, req: _Request) -> None:
        self._pool.free(req.blocks)
        req.blocks = []
        req.num_cached_blocks = 0
        req.num_computed = 0

    def _step_ms(self, scheduled: list[tuple[_Request, int]]) -> float:
        config = self.config
        prefill_tokens = decode_seqs = decode_blocks = 0
        for req, count in scheduled:
            if count == 1 and req.num_computed >= req.num_prompt - 1:
                decode_seqs += 1
                decode_blocks += len(req.blocks)
            else:
                prefill_tokens += count
        ms = 0.0
        if prefill_tokens:
            ms += config.prefill_base_ms + config.prefill_ms_per_token * prefill_tokens
        if decode_seqs:
            ms += (
                config.decode_base_ms
                + config.decode_ms_per_seq * decode_seqs
                + config.decode_ms_per_kv_block * decode_blocks
            )
        return ms

    def _advance(self, scheduled: list[tuple[_Request, int]]) -> None:
        for req, count in scheduled:
            if req.finish_reason is not None:
                continue  # aborted while the step ran; its blocks are already free
            req.num_computed += count
            self._cache_full_blocks(req)
            if req.num_computed == len(req.tokens):
                self._emit_token(req)

    def _cache_full_blocks(self, req: _Request) -> None:
        block_size = self.config.block_size
        full = req.num_computed // block_size
        start = req.num_cached_blocks
        if full <= start:
            return
        self._extend_hashes(req, full)
        self._pool.cache_full_blocks(
            req.blocks[start:full],
            req.hashes[start:full],
            req.hashes[start - 1] if start else None,
            req.tokens[start * block_size : full * block_size],
        )
        req.num_cached_blocks = full

    def _extend_hashes(self, req: _Request, num_blocks: int) -> None:
        have = len(req.hashes)
        if num_blocks <= have:
            return
        block_size = self.config.block_size
        parent = req.hashes[-1] if have else self._hash_root
        req.hashes.extend(block_hashes(req.tokens[have * block_size : num_blocks * block_size], block_size, parent))

    def _emit_token(self, req: _Request) -> None:
        mixed = _splitmix64(int.from_bytes(req.context.copy().digest(), "little") ^ req.seed)
        token = mixed % self.config.vocab_size
        if req.grammar is not None:
            token = req.grammar.pick(token, req.choice, req.tokens, req.num_prompt, lambda r: _splitmix64(mixed + r))
            if not req.grammar.accept(token):
                log.error("request %s: its grammar refused the token %d it allowed", req.id, token)
                self._finish(req, "error")
                return
        elif req.choice is not None:
            token = req.choice.pick(
                token, req.tokens, req.num_prompt, lambda rank: _splitmix64(mixed + rank), self.config.vocab_size
            )
        req.tokens.append(token)
        req.context.update(array("i", (token,)).tobytes())
        req.num_output += 1
        req.pending.append(token)
        if req.want_logprobs is not None:
            req.pending_logprobs.append(-((mixed >> 32) % 1000) / 1000.0)
        # The grammar's end (its stop token taken) ends the request whatever else it asked for.
        reason = "stop" if req.grammar is not None and req.grammar.terminated else self._stop_reason(req, token)
        if reason is not None:
            self._finish(req, reason)
        else:
            req.wake.set()

    def _stop_reason(self, req: _Request, token: int) -> str | None:
        stop = req.stop
        if req.num_output >= stop.max_tokens:
            return "length"
        if len(req.tokens) >= self.config.max_model_len:
            return "length"
        if req.num_output < stop.min_tokens:
            return None
        if token in stop.stop_token_ids:
            return "stop"
        if token == self.config.eos_token_id and not stop.ignore_eos:
            return "stop"
        return None

    def _finish(self, req: _Request, reason: str) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason = reason
        if req in self._running:
            self._running.remove(req)
        elif req in self._waiting:
            self._waiting.remove(req)
        transfer = self._transfers.pop(req.id, None)
        if transfer is not None:
            transfer.cancel()
        if req.hand_off and reason != "abort":
            self._hold_for_decode(req)
        else:
            self._release(req)
        self._requests.pop(req.id, None)
        req.wake.set()
        # An abort may free the blocks a stalled scheduler was waiting for.
        self._work.set()

    def _hold_for_decode(self, req: _Request) -> None:
        blocks, req.blocks = req.blocks, []
        req.kv_transfer_params = self._prefill_params(req, blocks)
        lease_s = self.config.kv_lease_s / self.config.speedup_ratio
        lease = asyncio.get_running_loop().call_later(lease_s, self._drop_held, req.id)
        self._held[req.id] = (blocks, lease)

    def _publish_kv_events(self) -> None:
        events = self._pool.take_events()
        if not events or self._on_kv_events is None:
            return
        batch = KvEventBatch(
            worker_id=self._worker_id,
            seq=self._event_seq,
            block_size=self.config.block_size,
            events=events,
            timestamp=time.time(),
        )
        self._event_seq += 1
        try:
            self._on_kv_events(batch)
        except Exception:
            log.exception("worker %s: KV event sink failed on batch %d", self._worker_id, batch.seq)

    # --- the token generator ---------------------------------------------------------

    def _generation_seed(self, request: PreprocessedRequest) -> int:
        """What the request's sampling adds to its context's hash (the engine's seed, its own)."""
        return ((request.sampling.seed or 0) * 0x9E3779B97F4A7C15 ^ self.config.seed) & _MASK64

    def _top_logprobs(self, req: _Request, token: int, logprob: float) -> list[TokenLogprob]:
        count = req.want_logprobs or 0
        alternatives = [TokenLogprob(token, logprob)]
        for rank in range(1, count):
            alternative = _splitmix64(req.seed ^ (token * 31 + rank)) % self.config.vocab_size
            alternatives.append(TokenLogprob(alternative, logprob - rank))
        return alternatives


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)
