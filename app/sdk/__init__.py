"""The service SDK: declare services and their graph; run them (see docs/internals.md §2)."""

from app.sdk.config import ConfigError, EngineConfig, GraphConfig, ServiceArgs, load_config
from app.sdk.runner import ServiceContext, drain_budget_s, run_service
from app.sdk.service import Service, depends, endpoint, on_shutdown, on_start, service

__all__ = [
    "ConfigError",
    "EngineConfig",
    "GraphConfig",
    "Service",
    "ServiceArgs",
    "ServiceContext",
    "depends",
    "drain_budget_s",
    "endpoint",
    "load_config",
    "on_shutdown",
    "on_start",
    "run_service",
    "service",
]
