"""The Processor section of a graph config: what the request pipeline is built from.

The Processor service takes it as its config, and a Frontend that runs the pipeline
itself (`embed-processor`) reads the same section.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.serving.pickers import Spread


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model path or name: its tokenizer and chat template")
    max_model_len: int | None = Field(default=None, ge=1, description="default: the model record's")
    spread: Spread = Field(
        default="round-robin",
        description="how a graph without a Router (graphs.agg, graphs.disagg) spreads requests over the workers",
    )
    # vLLM's server options of the same names: the Processor reads the model's text, so it
    # runs the parsers (the workers see token ids only).
    enable_auto_tool_choice: bool = Field(
        default=False, description='serve tool_choice "auto" (and tools without a tool_choice)'
    )
    tool_call_parser: str | None = Field(
        default=None, description="vLLM's tool parser for the model's own tool-call format (hermes, llama3_json, ...)"
    )
    tool_parser_plugin: str | None = Field(default=None, description="a Python file that registers more tool parsers")

    @model_validator(mode="after")
    def _parser_for_auto(self) -> PipelineConfig:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            # vLLM's rule.
            raise ValueError("enable-auto-tool-choice requires tool-call-parser")
        return self

    def auto_tool_parser(self) -> str | None:
        """The parser that serves tool_choice "auto", if that is enabled."""
        return self.tool_call_parser if self.enable_auto_tool_choice else None
