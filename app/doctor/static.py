"""Check `config` (`tandem doctor -f CONFIG`): the graph config's static checks, those of
`tandem config check` (every bad key named, vLLM's engine arguments included)."""

from __future__ import annotations

from app.doctor.check import Check, failed, passed
from app.protocol import names
from app.sdk import graph
from app.sdk.config import ConfigError, GraphConfig, load_config

NAME = "config"


def check_config(path: str) -> tuple[Check, GraphConfig | None]:
    """The check, and the config when it loads (the other checks read their settings there)."""
    try:
        graph.import_components()  # every known service name, so that each section is checked
        config = load_config(path)
        errors = config.check(None, check_engine_args=True)
    except (graph.GraphError, ConfigError) as exc:
        return failed(NAME, [f"{path}: {line}" for line in str(exc).splitlines()]), None
    if errors:
        return failed(NAME, [f"{path}: {line}" for line in errors], "`tandem config check` says the same"), config
    return passed(NAME, f"{path}: every section and key is valid"), config


def remote_prefill_timeout_s(config: GraphConfig | None) -> float:
    """How long the config's VllmWorkers wait for a PrefillWorker (the default without a config)."""
    from app.components.worker import VllmWorkerConfig

    default = float(VllmWorkerConfig.model_fields["remote_prefill_timeout_s"].default)
    if config is None or names.VLLM_WORKER not in config.raw:
        return default
    try:
        return config.section_config(names.VLLM_WORKER, VllmWorkerConfig).remote_prefill_timeout_s
    except ConfigError:
        return default
