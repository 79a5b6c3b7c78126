"""The routing-policy interface: one `select_worker` call per request.

A policy sees a `RoutingContext` (the prompt's blocks, each live worker's overlap with
them, each live worker's load) and returns a `RouteDecision`. It may keep state
(round-robin's cursor) and hear about finished requests through `on_request_finished`.
`needs_kv_index` tells the router whether to look the prompt up in the KV index at all.

Knobs come from the Router's config as a dict and are validated by the policy's
`Knobs` pydantic model; an unknown or invalid knob is a `PolicyConfigError` naming it.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import pydantic

from app.protocol import RouteDecision
from app.router.load import WorkerLoad


class PolicyConfigError(ValueError):
    """A policy name or knob in the configuration is wrong."""


@dataclass(slots=True, frozen=True)
class RoutingContext:
    request_id: str
    block_hashes: Sequence[int]  # the prompt's full blocks, as router hashes
    overlaps: Mapping[str, int]  # leading prompt blocks each live worker holds (absent = 0)
    load: Mapping[str, WorkerLoad]  # one entry per live worker
    workers: Sequence[str]  # live worker ids, sorted, never empty

    @property
    def prompt_blocks(self) -> int:
        return len(self.block_hashes)

    def decision(self, worker_id: str) -> RouteDecision:
        return RouteDecision(
            worker_id=worker_id, overlap_blocks=self.overlaps.get(worker_id, 0), prompt_blocks=self.prompt_blocks
        )


class NoKnobs(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class SeededKnobs(NoKnobs):
    seed: int | None = None  # fixes tie-breaks and sampling, for reproducible benchmarks


class RoutingPolicy(abc.ABC):
    name: ClassVar[str]
    needs_kv_index: ClassVar[bool] = False
    Knobs: ClassVar[type[pydantic.BaseModel]] = NoKnobs

    def __init__(self, knobs: pydantic.BaseModel) -> None:
        self.knobs = knobs

    @classmethod
    def from_knobs(cls, knobs: Mapping[str, Any] | None = None) -> Self:
        """Validate `knobs` (snake_case or kebab-case keys) and build the policy."""
        raw = {str(key).replace("-", "_"): value for key, value in (knobs or {}).items()}
        try:
            return cls(cls.Knobs.model_validate(raw))
        except pydantic.ValidationError as exc:
            known = ", ".join(cls.Knobs.model_fields) or "none"
            problems = []
            for error in exc.errors():
                knob = ".".join(str(part) for part in error["loc"])
                if error["type"] == "extra_forbidden":
                    problems.append(f"unknown knob {knob!r} (known: {known})")
                else:
                    problems.append(f"knob {knob!r}: {error['msg']}")
            raise PolicyConfigError(f"router policy {cls.name!r}: " + "; ".join(problems)) from None

    @abc.abstractmethod
    def select_worker(self, ctx: RoutingContext) -> RouteDecision:
        """Pick one of `ctx.workers`."""

    def on_request_finished(self, request_id: str, worker_id: str) -> None:  # noqa: B027 - most keep no per-request state
        """A request this policy placed has finished (optional hook)."""


class SeededPolicy(RoutingPolicy):
    """A policy with a random source of its own (tie-breaks, sampling), fixed by the `seed`
    knob: its Knobs are SeededKnobs or a subclass."""

    def __init__(self, knobs: SeededKnobs) -> None:
        super().__init__(knobs)
        self._rng = random.Random(knobs.seed)


def pick_lowest(costs: Mapping[str, float], rng: random.Random) -> str:
    """The key with the lowest cost; ties broken at random so equal workers share load."""
    best = min(costs.values())
    tied = [key for key, cost in costs.items() if cost <= best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)
