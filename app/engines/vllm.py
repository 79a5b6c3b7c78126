"""The vLLM engine: vLLM v1's AsyncLLM behind Tandem's Engine protocol.

Engine arguments pass through to `AsyncEngineArgs` unchanged, so a GPU node gets CUDA
vLLM and a CPU node gets the CPU build from the same config. The only arguments this
module owns are the KV events publisher (pointed at our relay) and the served name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import AsyncGenerator, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import msgspec
from vllm import SamplingParams
from vllm.config import KVEventsConfig, KVTransferConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.logprobs import LogprobsOnePosition
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.reasoning import ReasoningParserManager
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

from app.engines.base import Engine, EngineDeadError, EngineProcess, EngineProgress, EngineStats, KvEventSink
from app.engines.vllm_kv_events import VllmKvEventRelay
from app.engines.vllm_process import prepare_vllm_process
from app.engines.vllm_ray import with_ray_backend_if_needed
from app.engines.vllm_stats import SchedulerStatsCapture
from app.errors import InvalidRequestError
from app.protocol import (
    EngineOutput,
    ModelInfo,
    PreprocessedRequest,
    RankedLogprob,
    StructuredOutputs,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

# Config sections may carry these as JSON strings (as on vLLM's command line); vLLM's
# AsyncEngineArgs converts other nested configs from dicts itself, but not these two.
_NESTED_CONFIGS: dict[str, type] = {"kv_transfer_config": KVTransferConfig, "kv_events_config": KVEventsConfig}

# vLLM's "repetition" is a stop the engine chose, which OpenAI spells "stop".
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "error": "error", "repetition": "stop"}


def _nested_config(name: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"vllm engine argument {name}: not valid JSON: {exc}") from None
    if isinstance(value, dict):
        if name == "kv_transfer_config":
            value = _recompute_failed_loads(value)
        return _NESTED_CONFIGS[name](**value)
    return value


def _recompute_failed_loads(kv_transfer_config: dict[str, Any]) -> dict[str, Any]:
    """vLLM's default `kv_load_failure_policy` is "fail": a KV pull that fails (a prefill
    node gone, a NIXL timeout) ends the request with an error. Tandem's is "recompute":
    the decode engine computes the prompt itself, slower but answered. A config that sets
    the policy keeps it."""
    return {"kv_load_failure_policy": "recompute", **kv_transfer_config}


def _structured_outputs_params(structured: StructuredOutputs | None) -> StructuredOutputsParams | None:
    if structured is None:
        return None
    fields = msgspec.structs.asdict(structured)
    del fields["param"]
    return StructuredOutputsParams(**fields)


# The wire's sampling fields that vLLM's SamplingParams takes as they are, by the same name.
_SAMPLING_AS_IS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "prompt_logprobs",
    "logit_bias",
    "allowed_token_ids",
)


def sampling_params_for(request: PreprocessedRequest) -> SamplingParams:
    """vLLM sampling parameters for a request the Processor validated as far as it can.

    Raises vLLM's VLLMValidationError for a value vLLM refuses; the engine checks the rest
    (token ids against the vocabulary, bad_words in its tokenizer) when the request is added.
    Stop strings and the detokenizer's options never reach the engine: the Processor
    detokenizes and matches them.
    """
    sampling, stop = request.sampling, request.stop
    extra_args = {"kv_transfer_params": request.kv_transfer_params} if request.kv_transfer_params else None
    return SamplingParams(
        **{name: getattr(sampling, name) for name in _SAMPLING_AS_IS},
        bad_words=list(sampling.bad_words),
        structured_outputs=_structured_outputs_params(sampling.structured),
        max_tokens=stop.max_tokens,
        min_tokens=stop.min_tokens,
        stop_token_ids=list(stop.stop_token_ids),
        ignore_eos=stop.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
        # Token ids are what the Processor wants; detokenizing here would be wasted work.
        detokenize=False,
        extra_args=extra_args,
    )


def _logprobs(completion: CompletionOutput, num_top: int) -> tuple[list[float], list[list[TokenLogprob]]]:
    chosen: list[float] = []
    top: list[list[TokenLogprob]] = []
    # A sampled token's position always has its logprobs (FlatLogprobs' iterator says so;
    # its sequence type also allows the None of prompt positions).
    positions = cast("Iterable[LogprobsOnePosition]", completion.logprobs or ())
    for token_id, position in zip(completion.token_ids, positions, strict=True):
        chosen.append(position[token_id].logprob)
        # vLLM adds the sampled token to the top-N even when it ranks lower; OpenAI's
        # top_logprobs lists the N best only.
        best = sorted(position.items(), key=lambda item: item[1].logprob, reverse=True)[:num_top]
        top.append([TokenLogprob(token, logprob.logprob) for token, logprob in best])
    return chosen, top


def _prompt_logprobs(output: RequestOutput) -> list[list[RankedLogprob]]:
    """vLLM's prompt logprobs, position by position: the prompt token first (vLLM's order),
    then its alternatives; the first position, which nothing predicts, empty."""
    positions = cast("Iterable[LogprobsOnePosition | None]", output.prompt_logprobs or ())
    return [
        [RankedLogprob(token, logprob.logprob, logprob.rank or 0) for token, logprob in (position or {}).items()]
        for position in positions
    ]


class VllmEngine(Engine):
    """One vLLM AsyncLLM engine in this process (its engine core runs in a child process)."""

    def __init__(self, engine_args: dict[str, Any]) -> None:
        args = dict(engine_args)
        if "model" not in args:
            raise ValueError("vllm engine: `model` is required (a local directory or a model id)")
        if args.get("kv_events_config") is not None:
            raise ValueError("vllm engine: kv_events_config is managed by Tandem (it relays KV events itself)")
        for name in _NESTED_CONFIGS:
            if args.get(name) is not None:
                args[name] = _nested_config(name, args[name])
        # A model larger than the node runs on vLLM's Ray executor (app/engines/vllm_ray.py).
        args = with_ray_backend_if_needed(args)
        if not args.get("served_model_name"):
            model = str(args["model"])
            # A local model is served under its directory name, not its absolute path.
            args["served_model_name"] = Path(model).name if Path(model).is_dir() else model
        self._args = args
        self._llm: AsyncLLM | None = None
        self._relay: VllmKvEventRelay | None = None
        self._stats = SchedulerStatsCapture()
        self._worker_id = ""
        self._total_blocks = 0
        # Ends the engine's processes should this one die (app.launch.leftovers); it exits
        # with this process.
        self._leftovers_guard: subprocess.Popen[bytes] | None = None
        self._nixl_side_channel = ""

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> VllmEngine:
        """Build from a worker's config section (engine arguments, snake_case or kebab-case keys)."""
        return cls({key.replace("-", "_"): value for key, value in section.items()})

    @property
    def engine_args(self) -> Mapping[str, Any]:
        """What AsyncEngineArgs gets at start: the section's arguments, parsed and defaulted."""
        return MappingProxyType(self._args)

    @property
    def served_model_name(self) -> str:
        name = self._args["served_model_name"]
        return name[0] if isinstance(name, list) else str(name)

    async def prepare(self, process: EngineProcess) -> None:
        prepared = await prepare_vllm_process(self._args, process)
        self._leftovers_guard = prepared.guard
        self._nixl_side_channel = prepared.nixl_side_channel

    def nixl_side_channel(self) -> str:
        return self._nixl_side_channel

    async def start(self, worker_id: str, on_kv_events: KvEventSink | None = None) -> ModelInfo:
        if self._llm is not None:
            raise RuntimeError("vllm engine already started")
        self._worker_id = worker_id
        args = dict(self._args)
        if on_kv_events is not None:
            self._relay = VllmKvEventRelay(worker_id, on_kv_events)
            args["kv_events_config"] = self._relay.kv_events_config()
        try:
            engine_args = AsyncEngineArgs(**args)
        except TypeError as exc:
            await self._stop_relay()
            raise ValueError(f"vllm engine: bad engine arguments: {exc}") from None
        if args.get("reasoning_parser_plugin"):
            # As vLLM's server does first: the engine's config looks its reasoning parser up by name.
            ReasoningParserManager.import_reasoning_parser(args["reasoning_parser_plugin"])
        logger.info("starting vLLM engine for %s (worker %s)", args["model"], worker_id)
        try:
            # Building the engine blocks until its core process has loaded the model
            # (minutes for a large one). Off the event loop, so that the process keeps its
            # etcd lease and NATS connection alive meanwhile; AsyncLLM starts its output
            # handler lazily on the loop at the first request.
            self._llm = await asyncio.to_thread(
                AsyncLLM.from_engine_args, engine_args, stat_loggers=[self._stats.factory]
            )
        except BaseException:
            await self._stop_relay()
            raise
        config = self._llm.vllm_config
        block_size = config.cache_config.block_size
        self._total_blocks = config.cache_config.num_gpu_blocks or 0
        if self._relay is not None:
            self._relay.start(block_size)
        info = ModelInfo(
            name=self.served_model_name,
            max_model_len=config.model_config.max_model_len,
            block_size=block_size,
            model_path=str(args["model"]),
        )
        logger.info(
            "vLLM engine ready: %s, max_model_len %d, block size %d, %d KV blocks",
            info.name,
            info.max_model_len,
            info.block_size,
            self._total_blocks,
        )
        return info

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._llm is None:
            raise RuntimeError("vllm engine not started")
        num_top = request.sampling.logprobs or 0
        try:
            params = sampling_params_for(request)
            # Rendering checks the prompt against max_model_len with a clear error; raw
            # prompts handed to generate() are a deprecated path in vLLM.
            (engine_input,) = self._llm.renderer.render_cmpl([TokensPrompt(prompt_token_ids=request.token_ids)])
            stream = self._llm.generate(
                engine_input,
                params,
                request.request_id,
                reasoning_ended=request.reasoning_ended,
                reasoning_parser_kwargs=request.reasoning_parser_kwargs,
            )
        except VLLMClientError as exc:
            # The caller's mistake (a prompt past max_model_len, ...): a 400 with vLLM's words.
            param = getattr(exc, "parameter", None)
            raise InvalidRequestError(f"request {request.request_id}: {exc}", param=param) from exc
        except VllmEngineDeadError:
            raise EngineDeadError(f"request {request.request_id}: the vLLM engine core is dead") from None
        first = True
        try:
            async for output in stream:
                yield self._engine_output(output, first, num_top, params.logprobs is not None)
                first = False
        except VLLMClientError as exc:
            raise InvalidRequestError(f"request {request.request_id}: {exc}") from exc
        except VllmEngineDeadError:
            raise EngineDeadError(f"request {request.request_id}: the vLLM engine core died") from None
        finally:
            # vLLM's generator aborts the request (freeing its KV blocks) when closed
            # before it finished; closing it here makes that happen now, not at GC.
            await stream.aclose()

    def _engine_output(self, output: RequestOutput, first: bool, num_top: int, want_logprobs: bool) -> EngineOutput:
        completion = output.outputs[0]
        result = EngineOutput(token_ids=list(completion.token_ids), worker_id=self._worker_id)
        if want_logprobs and completion.token_ids:
            result.logprobs, result.top_logprobs = _logprobs(completion, num_top)
        if first:
            result.num_prompt_tokens = len(output.prompt_token_ids or ())
            result.num_cached_tokens = output.num_cached_tokens or 0
            if output.prompt_logprobs is not None:
                result.prompt_logprobs = _prompt_logprobs(output)
        if output.finished:
            reason = str(completion.finish_reason) if completion.finish_reason is not None else "stop"
            result.finish_reason = _FINISH_REASONS.get(reason, "error")
            result.kv_transfer_params = output.kv_transfer_params
        return result

    def stats(self) -> EngineStats:
        in_flight = self._llm.get_num_unfinished_requests() if self._llm is not None else 0
        return self._stats.snapshot(in_flight, self._total_blocks)

    def progress(self) -> EngineProgress:
        # Requests the front end tracks, and the engine core's steps as its stat loggers hear
        # of them: a core that is SIGSTOPped or stuck in a CUDA call sends none.
        pending = self._llm.get_num_unfinished_requests() if self._llm is not None else 0
        return EngineProgress(pending=pending, steps=self._stats.steps)

    def dead_reason(self) -> str | None:
        # `errored` turns true as soon as vLLM's monitor thread sees the engine core process
        # (or its output handler) end; from then on every request fails with EngineDeadError.
        if self._llm is not None and self._llm.errored:
            return "the vLLM engine core process is gone"
        if self._relay is not None:
            return self._relay.failure()
        return None

    async def stop(self) -> None:
        if self._llm is not None:
            logger.info("stopping vLLM engine (worker %s)", self._worker_id)
            self._llm.shutdown()
            self._llm = None
        await self._stop_relay()

    async def _stop_relay(self) -> None:
        if self._relay is not None:
            await self._relay.stop()
            self._relay = None
