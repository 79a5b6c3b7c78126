"""The Processor section of a graph config: what the request pipeline is built from.

The Processor service takes it as its config, and a Frontend that runs the pipeline
itself (`embed-processor`) reads the same section.
"""

from __future__ import annotations

from typing import Literal

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
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="the Processor service's /metrics (plus its replica index); a Frontend that runs the "
        "pipeline itself serves them on its own /metrics",
    )
    migration_limit: int = Field(
        default=3,
        ge=0,
        description="how many times a request whose worker fails mid-stream may move to another worker "
        "(0: never; the client then gets the failure)",
    )
    # Dynamo's Processor keys, so that its configs run as they are.
    block_size: int | None = Field(
        default=None,
        ge=1,
        description="accepted for Dynamo configs (which list block-size in the Processor's common-configs); "
        "the Processor does not use it: the Router's and the workers' block size is what counts",
    )
    router: Literal["kv", "round-robin", "random"] | None = Field(
        default=None,
        description="Dynamo's routing key: kv routes through the Router (the graph's Router decides); "
        "round-robin or random set spread (giving spread too with a different value is an error)",
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
    reasoning_parser: str | None = Field(
        default=None,
        description="vLLM's reasoning parser for the model's reasoning (deepseek_r1, qwen3, ...): chat answers "
        "carry it as `reasoning`, out of `content`; give the VllmWorker the same reasoning-parser, which makes "
        "its engine constrain structured outputs only after the reasoning",
    )
    reasoning_parser_plugin: str | None = Field(
        default=None, description="a Python file that registers more reasoning parsers"
    )

    @model_validator(mode="after")
    def _router_sets_spread(self) -> PipelineConfig:
        if self.router is None or self.router == "kv":
            return self
        if "spread" in self.model_fields_set and self.spread != self.router:
            raise ValueError(
                f"router {self.router!r} and spread {self.spread!r} disagree: router round-robin or random "
                "is Dynamo's name for spread, give one of them"
            )
        self.spread = self.router
        return self

    @model_validator(mode="after")
    def _parser_for_auto(self) -> PipelineConfig:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            # vLLM's rule.
            raise ValueError("enable-auto-tool-choice requires tool-call-parser")
        return self

    def auto_tool_parser(self) -> str | None:
        """The parser that serves tool_choice "auto", if that is enabled."""
        return self.tool_call_parser if self.enable_auto_tool_choice else None
