"""Aggregated serving: each VllmWorker prefills and decodes; the Processor picks workers itself."""

from app.components.frontend import Frontend
from app.components.processor import Processor
from app.components.worker import VllmWorker

Frontend.link(Processor).link(VllmWorker)

__all__ = ["Frontend", "Processor", "VllmWorker"]
