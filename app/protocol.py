"""Wire types of the request path, shared by Processor, Router, workers and engines.

msgspec structs, msgpack on the wire. Versioned by field additions only: a new field
always has a default, so an older peer that omits it still decodes.
"""

from __future__ import annotations

import msgspec


class SamplingOptions(msgspec.Struct, omit_defaults=True, kw_only=True):
    """OpenAI sampling parameters, already validated by the Processor."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled (vLLM's convention)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # number of top logprobs per generated token


class StopConditions(msgspec.Struct, omit_defaults=True, kw_only=True):
    max_tokens: int
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    min_tokens: int = 0


class PreprocessedRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What a worker needs to generate: token ids in, token ids out."""

    request_id: str
    model: str
    token_ids: list[int]
    sampling: SamplingOptions
    stop: StopConditions
    # Set by disaggregated serving: the prefill side's KV hand-off (vLLM kv_transfer_params).
    kv_transfer_params: dict | None = None


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float


class EngineOutput(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One step of a generation: the tokens added since the previous output."""

    token_ids: list[int] = []
    # One entry per token in token_ids: (chosen token logprob, top alternatives).
    logprobs: list[float] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    # Sent with the first output of a request.
    num_prompt_tokens: int | None = None
    num_cached_tokens: int | None = None
    # Which instance served the request (and which prefilled it, when disaggregated).
    worker_id: str | None = None
    prefill_worker_id: str | None = None
    kv_transfer_params: dict | None = None


class ModelInfo(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What a worker tells the fleet about the model it serves (the etcd model record)."""

    name: str
    max_model_len: int
    block_size: int
    model_path: str = ""  # where the tokenizer and chat template are read from


class LoadReport(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Published periodically by every worker on the events plane (topic `load`)."""

    worker_id: str
    running: int
    waiting: int
    kv_used_blocks: int
    kv_total_blocks: int
    timestamp: float = 0.0


EngineBlockHash = int | bytes


class BlockStored(msgspec.Struct, tag="stored", omit_defaults=True, kw_only=True):
    """Blocks the engine cached, as vLLM reports them.

    token_ids covers every block (block_size tokens each). block_hashes are the engine's
    own hashes, used only to match later removals; the router keys its index by hashes
    it computes itself from token_ids, chained from the parent block's.
    """

    token_ids: list[int]
    block_hashes: list[EngineBlockHash]
    parent_block_hash: EngineBlockHash | None = None


class BlockRemoved(msgspec.Struct, tag="removed", omit_defaults=True, kw_only=True):
    block_hashes: list[EngineBlockHash]


class AllBlocksCleared(msgspec.Struct, tag="cleared"):
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KvEventBatch(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Published by every worker on the events plane (topic `kv`), in sequence order."""

    worker_id: str
    seq: int
    block_size: int
    events: list[KvEvent]
    timestamp: float = 0.0


class RouteRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    request_id: str
    token_ids: list[int]


class RouteDecision(msgspec.Struct, omit_defaults=True, kw_only=True):
    worker_id: str
    overlap_blocks: int = 0
    prompt_blocks: int = 0
