"""What `tandem serve ADDRESS -f CONFIG [--service-name S]` runs: the graph's services, its
checked config, and which services run inside another rather than in processes of their own.

One place for that decision, read by `tandem serve` and by the container's entrypoint
(entrypoints/render.py, which sizes its stop wait and the frontend role's programs by it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.sdk.config import ConfigError, GraphConfig, load_config
from app.sdk.graph import graph_services, import_components, resolve
from app.sdk.service import ServiceSpec


@dataclass(frozen=True)
class ServePlan:
    services: list[ServiceSpec]  # the graph's, or the one --service-name names
    config: GraphConfig
    embedded: frozenset[str]  # services another runs in its own process (the Router in the Frontend)

    @property
    def separate(self) -> list[ServiceSpec]:
        """The services that get processes of their own."""
        return [s for s in self.services if s.name not in self.embedded]


def serve_plan(
    address: str, config_file: str | None, overrides: Sequence[str] = (), service_name: str | None = None
) -> ServePlan:
    """GraphError or ConfigError (every error of the services' sections) where it cannot run.

    Engine arguments are not checked: importing vLLM would cost seconds on nodes (and in
    --dry-run) that never run an engine; each worker process checks its own."""
    module, entry = resolve(address)
    services = graph_services(module, entry, service_name)
    import_components()  # every known service name, so that every config section is checked
    config = load_config(config_file, overrides)
    errors = config.check(services, check_engine_args=False)
    if errors:
        raise ConfigError(errors)
    return ServePlan(services, config, frozenset(config.embedded_services(services)))
