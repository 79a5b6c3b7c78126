"""The Processor section of a graph config: what the request pipeline is built from.

The Processor service takes it as its config, and a Frontend that runs the pipeline
itself (`embed-processor`) reads the same section.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.serving.pickers import Spread


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model path or name: its tokenizer and chat template")
    max_model_len: int | None = Field(default=None, ge=1, description="default: the model record's")
    spread: Spread = Field(
        default="round-robin",
        description="how a graph without a Router (graphs.agg, graphs.disagg) spreads requests over the workers",
    )
