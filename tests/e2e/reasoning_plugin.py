"""The conformance tier's reasoning parser, a plugin both servers load (vLLM's
`--reasoning-parser-plugin`, the graph's `reasoning-parser-plugin`): vLLM's deepseek_v3,
which reasons as DeepSeek-R1's parser where the chat template's `thinking` is on and leaves
all to content otherwise, here keyed on the template variable `tiny_thinking` alone.

deepseek_v3 itself also reasons with `enable_thinking`, which vLLM sets for the Responses
API's reasoning effort (and Tandem as it does): those cases would turn to reasoning, and
the tiny model's text, which never holds `</think>`, to reasoning alone. With this key only
the cases that ask for it reason (tests/e2e/conformance_cases.py, THINKING).
"""

from __future__ import annotations

from typing import Any

from vllm.reasoning import ReasoningParserManager
from vllm.reasoning.deepseek_v3_reasoning_parser import DeepSeekV3ReasoningParser

NAME = "tiny_thinking"


class TinyThinkingReasoningParser(DeepSeekV3ReasoningParser):
    def __init__(self, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
        thinking = bool((kwargs.get("chat_template_kwargs") or {}).get(NAME))
        super().__init__(tokenizer, *args, **{**kwargs, "chat_template_kwargs": {"thinking": thinking}})


ReasoningParserManager.register_module(NAME, module=TinyThinkingReasoningParser)
