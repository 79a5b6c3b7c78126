"""Disaggregated serving: long prefills go to PrefillWorkers through the prefill queue."""

from app.components.frontend import Frontend
from app.components.prefill_worker import PrefillWorker
from app.components.processor import Processor
from app.components.worker import VllmWorker

Frontend.link(Processor).link(VllmWorker).link(PrefillWorker)

__all__ = ["Frontend", "PrefillWorker", "Processor", "VllmWorker"]
