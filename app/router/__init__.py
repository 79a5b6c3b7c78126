"""KV-aware routing: the block index, load tracking and routing policies (no NATS here)."""

from app.router.hashing import block_hashes
from app.router.index import BlockSizeMismatchError, KvIndex
from app.router.load import LoadTracker, PlacementEvent, WorkerLoad
from app.router.policies import POLICIES, NoWorkersError, PolicyConfigError, RoutingContext, RoutingPolicy, create_policy
from app.router.router import KvRouter, RouterCounters

__all__ = [
    "POLICIES",
    "BlockSizeMismatchError",
    "KvIndex",
    "KvRouter",
    "LoadTracker",
    "NoWorkersError",
    "PlacementEvent",
    "PolicyConfigError",
    "RouterCounters",
    "RoutingContext",
    "RoutingPolicy",
    "WorkerLoad",
    "block_hashes",
    "create_policy",
]
