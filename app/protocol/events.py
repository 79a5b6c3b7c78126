"""Events plane: what workers and router replicas publish (topics in app/protocol/names.py).

Every VllmWorker publishes `KvEventBatch`es (topic `kv`) and `LoadReport`s (topic `load`);
router replicas (Routers, Frontends that embed the router) and Processors share
`PlacementEvent`s (topic `placement`); router replicas publish `RouterReport`s (topic
`router`) for `tandem status`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# --- KV events: VllmWorker -> router replicas ------------------------------------------

EngineBlockHash = int | bytes

# How a router replica keys the blocks of a worker's KV events: its own chained hash of
# each block's token ids, which every BlockStored carries (app/router/hashing.py); the
# engine's hashes only match removals. Workers (ModelInfo) and router replicas
# (RouterReport) publish it, and `tandem doctor` fails where they differ: a build that keys
# blocks otherwise names another scheme here.
KV_HASH_SCHEME = "token-ids/cpython-tuple-hash"


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
    """One engine's KV events, in sequence order.

    The engine numbers its batches; a worker sends the consecutive ones of a few
    milliseconds as one (app/engines/host.py): that message carries batches `first_seq`
    to `seq`, their events in order. `first_seq` is left out (None) where a message is one
    batch, as older workers send every batch: it is `seq` then.
    """

    worker_id: str
    seq: int
    block_size: int
    events: list[KvEvent]
    timestamp: float = 0.0
    first_seq: int | None = None

    @property
    def seq_from(self) -> int:
        """The first batch this message carries (`seq` the last)."""
        return self.seq if self.first_seq is None else self.first_seq


class KvBlocksWanted(msgspec.Struct, kw_only=True):
    """A router replica's call for a worker's whole cache (it started, missed events, or
    forgot the worker): the worker streams `KvEventBatch`es, the first a clear, all with the
    seq of its last published batch, which its later batches follow."""

    router_id: str


# --- load: VllmWorker -> router replicas ------------------------------------------------


class LoadReport(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Published periodically by every worker."""

    worker_id: str
    running: int
    waiting: int
    kv_used_blocks: int
    kv_total_blocks: int
    timestamp: float = 0.0
    # Prompt tokens served from / looked up in the prefix cache, since the engine started.
    prefix_cache_hits: int = 0
    prefix_cache_queries: int = 0


# --- router reports: router replicas -> `tandem status` ---------------------------------


class RouterReport(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Published periodically by every router replica (a Router, or a Frontend with
    `embed-router`): its policy and counters since it started, and the workers whose KV
    events it cannot use (app/router/kv_health.py)."""

    router_id: str
    policy: str
    knobs: dict[str, Any] = {}
    decisions: int = 0
    prompt_blocks: int = 0
    hit_blocks: int = 0
    rejected_kv_batches: int = 0
    indexed_blocks: int = 0
    kv_silent_workers: list[str] = []  # serving, yet no KV events for longer than the limit
    kv_rejected_workers: list[str] = []  # their KV events rejected (block size mismatch)
    timestamp: float = 0.0
    # What its index takes (0 / "": a replica of an older Tandem): KV events of this block
    # size and hash scheme, from workers of this model ("": whichever model it routes).
    block_size: int = 0
    hash_scheme: str = ""
    model: str = ""
    # Workers' KV views it replaced by a dump of their cache, and those that sent none, by
    # why: start, seq_gap, registered (app/router/kv_resync.py).
    kv_resyncs: dict[str, int] = {}
    kv_resync_failures: dict[str, int] = {}


# --- placements: among router replicas and Processors (app/router/load.py) --------------

PlacementKind = Literal["routed", "prefill_done", "finished"]


class PlacementEvent(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A router replica's placement news, shared with the other replicas."""

    router_id: str
    request_id: str
    worker_id: str
    kind: PlacementKind
    prompt_blocks: int = 0
    overlap_blocks: int = 0


# A message is the events of a few milliseconds (app/router/placements.py); a lone event
# (older publishers) is understood too.
PlacementMessage = PlacementEvent | list[PlacementEvent]
