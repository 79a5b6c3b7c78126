"""Disaggregated serving with KV-aware routing."""

from app.components.frontend import Frontend
from app.components.kv_router import Router
from app.components.prefill_worker import PrefillWorker
from app.components.processor import Processor
from app.components.worker import VllmWorker

Frontend.link(Processor).link(Router).link(VllmWorker).link(PrefillWorker)

__all__ = ["Frontend", "PrefillWorker", "Processor", "Router", "VllmWorker"]
