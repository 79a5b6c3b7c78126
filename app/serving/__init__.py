"""Serving a request: the pipeline (preprocess -> pick a worker -> stream -> postprocess),
the worker pickers, and the backend the HTTP layer serves from."""

from app.serving.config import PipelineConfig
from app.serving.pickers import (
    Placement,
    ReplicaPicker,
    RouterServicePicker,
    SpreadPicker,
    WorkerPicker,
    create_picker,
)
from app.serving.pipeline import RequestPipeline

__all__ = [
    "PipelineConfig",
    "Placement",
    "ReplicaPicker",
    "RequestPipeline",
    "RouterServicePicker",
    "SpreadPicker",
    "WorkerPicker",
    "create_picker",
]
