"""The Router section of a graph config, and the router replica it configures.

The Router service runs that replica in each of its processes; a Frontend with
`embed-router` builds the same one from the same section in its own process.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.metrics import replica_port
from app.router.policies import PolicyName
from app.router.replica import RouterReplica
from app.router.runtime_feed import RuntimeFleetFeed
from app.router.tunables import ROUTER_POLICY
from app.runtime import EndpointClient, Runtime


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: PolicyName = Field(
        default=ROUTER_POLICY.default.policy, description="the routing policy (app/router/policies/)"
    )
    knobs: dict[str, Any] = Field(default=ROUTER_POLICY.default.knobs, description="the policy's own parameters")
    model: str = Field(default="", description="take the KV block size from this model's workers; default: any's")
    block_size: int | None = Field(default=None, ge=1, description="KV block size; default: the model record's")
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="serve Prometheus /metrics here (replica i on metrics-port + i): hit rate, decision time",
    )
    report_interval_s: float = Field(
        default=2.0, gt=0, description="how often each replica publishes its RouterReport (for `tandem status`)"
    )
    kv_silence_s: float = Field(
        default=60.0,
        gt=0,
        description="warn when a worker runs requests this long without publishing KV events",
    )
    router: PolicyName | None = Field(
        default=None,
        description="Dynamo's spelling of `policy` (its configs say `router: kv`): sets policy; giving both "
        "with different values is an error",
    )

    @model_validator(mode="after")
    def _router_is_policy(self) -> RouterConfig:
        # Dynamo configs name the policy `router`; the rest of Tandem reads `policy` only.
        if self.router is None:
            return self
        if "policy" in self.model_fields_set and self.policy != self.router:
            raise ValueError(
                f"router {self.router!r} and policy {self.policy!r} disagree: router is Dynamo's name for "
                "policy, give one of them"
            )
        self.policy = self.router
        return self


def router_replica(
    runtime: Runtime,
    config: RouterConfig,
    workers: EndpointClient,
    replica: int,
    registry: CollectorRegistry | None = None,
) -> RouterReplica:
    """The replica `config` describes, fed through `runtime`. `workers`: the client of the
    workers' `generate` endpoint; `replica`: this process's index among its service's on
    the node; `registry`: where its metrics go (the Frontend's, when embedded)."""
    return RouterReplica(
        RuntimeFleetFeed(runtime, workers, model=config.model),
        policy=config.policy,
        knobs=config.knobs,
        block_size=config.block_size,
        model=config.model,
        replica_id=runtime.instance_id,
        registry=registry,
        metrics_port=replica_port(config.metrics_port, replica),
        report_interval_s=config.report_interval_s,
        kv_silence_s=config.kv_silence_s,
    )
