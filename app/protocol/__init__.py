"""Every wire type and every name on the wire, by plane.

msgspec structs, msgpack on the wire. Versioned by field additions only: a new field
always has a default, so an older peer that omits it still decodes. Nothing here imports
the rest of Tandem, so every layer (the runtime included) can import it.

- `names`: services, endpoints, topics, queues, NATS subjects, etcd keys
- `requests`: what endpoints take and stream
- `events`: KV events, load reports, placements
- `prefill`: the disaggregated-prefill hand-off (a queue job and its answer)
- `discovery`: the records kept in etcd
"""

from app.protocol.discovery import InstanceRecord, ModelInfo, ModelRecord, ProcessRecord
from app.protocol.events import (
    KV_HASH_SCHEME,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineBlockHash,
    KvBlocksWanted,
    KvEvent,
    KvEventBatch,
    LoadReport,
    PlacementEvent,
    PlacementKind,
    PlacementMessage,
    RouterReport,
)
from app.protocol.prefill import PREFILL_ACK_WAIT_S, PrefillAnswer, PrefillJob, PrefillWanted
from app.protocol.requests import (
    EchoedPrompt,
    EngineOutput,
    PreprocessedRequest,
    PromptLogprob,
    RankedLogprob,
    RouteDecision,
    RouteRequest,
    SamplingOptions,
    StopConditions,
    StreamItem,
    StructuredOutputs,
    TokenLogprob,
    TokenLogprobs,
    ToolCallDelta,
    TopLogprob,
)

__all__ = [
    "KV_HASH_SCHEME",
    "PREFILL_ACK_WAIT_S",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EchoedPrompt",
    "EngineBlockHash",
    "EngineOutput",
    "InstanceRecord",
    "KvBlocksWanted",
    "KvEvent",
    "KvEventBatch",
    "LoadReport",
    "ModelInfo",
    "ModelRecord",
    "PlacementEvent",
    "PlacementKind",
    "PlacementMessage",
    "PrefillAnswer",
    "PrefillJob",
    "PrefillWanted",
    "PreprocessedRequest",
    "ProcessRecord",
    "PromptLogprob",
    "RankedLogprob",
    "RouteDecision",
    "RouteRequest",
    "RouterReport",
    "SamplingOptions",
    "StopConditions",
    "StreamItem",
    "StructuredOutputs",
    "TokenLogprob",
    "TokenLogprobs",
    "ToolCallDelta",
    "TopLogprob",
]
