"""KV-aware routing: the block index, load tracking, routing policies, and the router replica
that keeps them current from the fleet.

Nothing here imports NATS or etcd: a replica hears the fleet through a `FleetFeed`, and
`app.router.runtime_feed` (not imported here) is the feed over the runtime.
"""

from app.router.core import RoutingCore, RoutingCounters
from app.router.feed import FleetFeed, FleetListener
from app.router.hashing import block_hashes
from app.router.index import BlockSizeMismatchError, KvIndex
from app.router.load import LoadTracker, WorkerLoad
from app.router.placements import PlacementPublisher
from app.router.policies import POLICIES, PolicyConfigError, RoutingContext, RoutingPolicy, create_policy
from app.router.replica import RouterReplica

__all__ = [
    "POLICIES",
    "BlockSizeMismatchError",
    "FleetFeed",
    "FleetListener",
    "KvIndex",
    "LoadTracker",
    "PlacementPublisher",
    "PolicyConfigError",
    "RouterReplica",
    "RoutingContext",
    "RoutingCore",
    "RoutingCounters",
    "RoutingPolicy",
    "WorkerLoad",
    "block_hashes",
    "create_policy",
]
