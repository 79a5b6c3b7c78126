"""Reasoning models: what a model writes before its answer (DeepSeek-R1's `<think>...</think>`),
split off the answer by vLLM's reasoning parsers, by the names vLLM's `--reasoning-parser` takes.

As vLLM's chat server does it (vllm/entrypoints/openai/chat_completion/serving.py, through
`DelegatingParser.parse_delta` of vllm/parser/abstract_parser.py): each piece of a choice's
text goes through the reasoning parser first, and what it passes on as content goes on to the
tool-call reader (app/preprocess/tools.py), so tool calls are read after the reasoning;
`include_reasoning: false` leaves the reasoning out. Completions have no split (nor in vLLM).

The parser is vLLM's `Parser` composed of the reasoning parser alone (vLLM's `ParserManager`);
Tandem's own readers find the tool calls. Loading it imports vLLM and torch (about 13 s on
this machine), so a Preprocessor loads it once, when it starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.openai.schema import ChatCompletionRequest
from app.preprocess.tool_parsers import vllm_chat_request


def load_reasoning_parser(name: str, plugin: str | None, tokenizer: Any) -> Any:
    """vLLM's Parser class for the reasoning parser `name` (after importing `plugin`, a file that
    registers more parsers, as vLLM's `--reasoning-parser-plugin`), checked against the model's
    tokenizer as vLLM's server checks it when it starts; ValueError saying what is wrong."""
    from vllm.parser import ParserManager
    from vllm.parser.abstract_parser import DelegatingParser
    from vllm.reasoning import ReasoningParserManager

    if plugin:
        ReasoningParserManager.import_reasoning_parser(plugin)
    known = ReasoningParserManager.list_registered()
    if name not in known:
        raise ValueError(f"reasoning-parser {name!r} is not one of vLLM's reasoning parsers: {', '.join(known)}")
    try:
        parser_class = ParserManager.get_parser(reasoning_parser_name=name, tokenizer=tokenizer)
    except TypeError as exc:  # vLLM's words: the tokenizer lacks the parser's tokens
        raise ValueError(str(exc)) from None
    if parser_class is None or not issubclass(parser_class, DelegatingParser):
        # vLLM's `hf` parser reads reasoning and tool calls in one pass, which leaves no
        # content for Tandem's tool-call readers.
        raise ValueError(f"reasoning-parser {name!r} reads tool calls as well, which Tandem does not serve")
    return parser_class


def template_kwargs(request: ChatCompletionRequest) -> dict[str, Any]:
    """The chat template's variables as vLLM hands them to its parsers: some choose by them
    (deepseek_v3 reasons only with `thinking`)."""
    return {
        **(request.template_variables() or {}),
        "add_generation_prompt": request.add_generation_prompt,
        "continue_final_message": request.continue_final_message,
    }


def _parser(parser_class: Any, tokenizer: Any, request: ChatCompletionRequest, tools: Any = None) -> Any:
    return parser_class(tokenizer, tools, chat_template_kwargs=template_kwargs(request))


def engine_reasoning(
    parser_class: Any, tokenizer: Any, request: ChatCompletionRequest, prompt_token_ids: Sequence[int]
) -> tuple[bool, dict[str, Any]]:
    """What an engine with a reasoning parser needs to constrain structured outputs after the
    reasoning only, as vLLM's server sends it (`resolve_reasoning_ended`): whether the prompt
    already ended the reasoning (true where the reasoning is hidden: then from the first token),
    and the parser's kwargs."""
    ended = not request.include_reasoning or bool(
        _parser(parser_class, tokenizer, request).is_reasoning_end(list(prompt_token_ids))
    )
    return ended, {"chat_template_kwargs": template_kwargs(request)}


class ReasoningReader:
    """One choice's text through vLLM's reasoning parser: each piece's reasoning, and the
    content (text and token ids) that goes on to the tool-call reader."""

    def __init__(
        self,
        parser_class: Any,
        tokenizer: Any,
        request: ChatCompletionRequest,
        prompt_token_ids: Sequence[int],
        *,
        count_every_step: bool = False,
    ) -> None:
        """`count_every_step`: count the reasoning tokens after every piece (continuous usage
        stats), not only at the end: each count reads the whole output again, as vLLM's."""
        self._request = vllm_chat_request(request, "the reasoning parser")
        self._parser = _parser(parser_class, tokenizer, request, self._request.tools)
        # Some parsers need special tokens kept in the text: their markers (Kimi K3's).
        self._request = self._parser.adjust_request(self._request)
        self.skip_special_tokens: bool = self._request.skip_special_tokens
        self.spaces_between_special_tokens: bool = self._request.spaces_between_special_tokens
        self._prompt_token_ids = list(prompt_token_ids)
        # A prompt may end the reasoning (a template that closes it), or the parser may not
        # reason for this request (deepseek_v3 without `thinking`): then all is content.
        self._in_reasoning = not self._parser.is_reasoning_end(self._prompt_token_ids)
        self._split = self._in_reasoning
        self._count_every_step = count_every_step
        self._generated: list[int] = []

    def feed(
        self, text: str, token_ids: Sequence[int], generated: Sequence[int], *, finished: bool
    ) -> tuple[str | None, str, list[int]]:
        """(reasoning, content, the content's token ids) of the next piece of text; `token_ids`
        made `text`, `generated` are all the tokens the engine made in the step (its stop token
        too), which the reasoning token count reads. The first piece of a choice whose text
        the parser splits has reasoning "" at least."""
        self._generated += generated
        in_reasoning = self._in_reasoning
        ids = list(token_ids)
        delta = self._parser.parse_delta(text, ids, self._request, self._prompt_token_ids, finished=finished)
        reasoning = delta.reasoning if delta is not None else None
        content = (delta.content or "") if delta is not None else ""
        if not in_reasoning:
            content_ids = ids
        # vLLM's parser keeps whether the reasoning has ended in its stream state; the piece
        # that ends it passes on the ids after the end (as parse_delta hands them to a tool parser).
        elif self._parser._stream_state.reasoning_ended:
            self._in_reasoning = False
            content_ids = self._parser.reasoning_parser.extract_content_ids(ids)
        else:
            content_ids = []
        if self._split:
            self._split = False
            reasoning = reasoning or ""
        return reasoning, content, content_ids

    def reasoning_tokens(self, finished: bool) -> int | None:
        """The reasoning tokens so far (vLLM's count), when they are reported: at the end, or
        after every piece for continuous usage stats."""
        if not (finished or self._count_every_step):
            return None
        return int(self._parser.count_reasoning_tokens(tuple(self._generated)))
