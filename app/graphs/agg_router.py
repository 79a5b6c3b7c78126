"""Aggregated serving with KV-aware routing."""

from app.components.frontend import Frontend
from app.components.kv_router import Router
from app.components.processor import Processor
from app.components.worker import VllmWorker

Frontend.link(Processor).link(Router).link(VllmWorker)

__all__ = ["Frontend", "Processor", "Router", "VllmWorker"]
