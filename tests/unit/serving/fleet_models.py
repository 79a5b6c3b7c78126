"""Which worker serves which model, as a picker hears it from the runtime's `ModelsWatch`:
an in-memory `ModelsSource` for the pipeline's unit tests (no etcd)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

MODEL = "tiny-llama"


class FakeModels:
    """The runtime's `Discovery` and the `ModelsWatch` it gives: `served[w]` is worker w's
    model (MODEL for a worker not named)."""

    def __init__(self, served: Mapping[str, str] | None = None) -> None:
        self.served = dict(served or {})

    async def watch_models(self) -> FakeModels:
        return self

    def serving(self, model: str, instance_ids: Iterable[str]) -> list[str]:
        return [w for w in instance_ids if not model or self.served.get(w, MODEL) == model]

    async def close(self) -> None:
        pass
