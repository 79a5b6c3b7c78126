"""A reasoning model's text through the pipeline with vLLM's own reasoning parsers: the
reasoning split off the content (token by token and in larger pieces), tool calls read after
it, what the engine is told for structured outputs, and the count of reasoning tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest

from app.openai.schema import ChatCompletionRequest, CompletionRequest, parse_request
from app.preprocess import Preprocessor
from app.protocol import EngineOutput, StreamItem

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
THOUGHT = "<think>The user wants weather. Maybe 日本語 🙂?</think>"


@pytest.fixture(scope="module")
def r1(tiny_model: Path) -> Preprocessor:
    # vLLM's deepseek_r1 parser (and hermes for tool_choice "auto"), as a Processor configured so.
    return Preprocessor(tiny_model, reasoning_parser="deepseek_r1", tool_call_parser="hermes")


def _chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(ChatCompletionRequest, body)


def _stream(preprocessor: Preprocessor, request: Any, text: str, *, step: int = 1) -> list[StreamItem]:
    """The items of `text` as an engine streams it, ending with EOS (finish "stop"): the first
    token alone (the prefill's), then `step` tokens an output (vLLM's outputs of a request
    that the consumer reads late hold several)."""
    post = preprocessor.postprocessor(request, preprocessor.preprocess(request, "r1"))
    ids = [*preprocessor.tokenizer.encode(text, add_special_tokens=False), preprocessor.eos_token_ids[0]]
    pieces = [ids[:1]] + [ids[i : i + step] for i in range(1, len(ids), step)]
    return [
        post.process(EngineOutput(token_ids=piece, finish_reason="stop" if i == len(pieces) - 1 else None))
        for i, piece in enumerate(pieces)
    ]


def _reasoning(items: list[StreamItem]) -> str:
    return "".join(item.reasoning or "" for item in items)


def _content(items: list[StreamItem]) -> str:
    return "".join(item.text for item in items)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_the_reasoning_is_split_off_the_content(r1: Preprocessor, step: int) -> None:
    items = _stream(r1, _chat(), THOUGHT + "It is sunny.", step=step)
    assert _reasoning(items) == "The user wants weather. Maybe 日本語 🙂?"
    assert _content(items) == "It is sunny."
    assert items[-1].finish_reason == "stop"


def test_each_token_of_the_reasoning_streams_as_it_comes(r1: Preprocessor) -> None:
    items = _stream(r1, _chat(), THOUGHT + "It is sunny.")
    reasoning_pieces = [item.reasoning for item in items if item.reasoning]
    assert len(reasoning_pieces) > 5
    # Never a marker in either, nor content before the reasoning ends.
    assert not any("think>" in (item.reasoning or "") + item.text for item in items)
    last_reasoning = max(i for i, item in enumerate(items) if item.reasoning)
    assert not any(item.text for item in items[:last_reasoning])


def test_a_choice_whose_text_is_split_says_so_on_its_first_item(r1: Preprocessor) -> None:
    """The first item holds reasoning "" at least (the <think> token alone has no text): a
    whole body then has `reasoning`, and no text after it is content null, as vLLM's."""
    items = _stream(r1, _chat(), THOUGHT)
    assert items[0].reasoning == ""
    assert _content(items) == "" and _reasoning(items)


def test_text_without_markers_is_reasoning_as_deepseek_r1s_parser_has_it(r1: Preprocessor) -> None:
    # R1's templates open the reasoning in the prompt; its parser takes a text without
    # </think> as reasoning that never ended.
    items = _stream(r1, _chat(), "Still thinking")
    assert (_reasoning(items), _content(items)) == ("Still thinking", "")


def test_a_prompt_that_ended_the_reasoning_leaves_all_to_content(r1: Preprocessor) -> None:
    request = _chat(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>old</think>Done."}],
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert r1.preprocess(request, "r1").reasoning_ended is True
    items = _stream(r1, request, " More.")
    assert (_reasoning(items), _content(items)) == ("", " More.")


def test_the_reasoning_token_count_is_vllms_on_the_last_item(r1: Preprocessor) -> None:
    from vllm.reasoning.deepseek_r1_reasoning_parser import DeepSeekR1ReasoningParser

    items = _stream(r1, _chat(), THOUGHT + "It is sunny.")
    ids = [*r1.tokenizer.encode(THOUGHT + "It is sunny.", add_special_tokens=False), r1.eos_token_ids[0]]
    expected = DeepSeekR1ReasoningParser(cast(Any, r1.tokenizer)).count_reasoning_tokens(ids)
    assert expected > 5
    assert [item.reasoning_tokens for item in items] == [None] * (len(items) - 1) + [expected]
    # Continuous usage stats: every item counts the reasoning so far.
    streamed = _stream(
        r1, _chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}), THOUGHT
    )
    counts = [item.reasoning_tokens or 0 for item in streamed]
    assert all(item.reasoning_tokens is not None for item in streamed)
    assert counts == sorted(counts) and counts[-1] > 0


def test_tool_calls_are_read_after_the_reasoning_only(r1: Preprocessor) -> None:
    """A call spelled inside the reasoning is reasoning; the one after it is the call."""
    thought = '<think>Maybe <tool_call>{"name": "get_time", "arguments": {}}</tool_call>?</think>'
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    items = _stream(r1, _chat(tools=[WEATHER]), thought + "Checking. " + call)
    assert _reasoning(items) == 'Maybe <tool_call>{"name": "get_time", "arguments": {}}</tool_call>?'
    assert _content(items).strip() == "Checking."
    pieces = [piece for item in items for piece in item.tool_calls or ()]
    assert {piece.name for piece in pieces if piece.name} == {"get_weather"}
    assert json.loads("".join(piece.arguments for piece in pieces)) == {"city": "Oslo"}
    assert items[-1].finish_reason == "tool_calls"


def test_a_named_call_takes_the_content_after_the_reasoning(r1: Preprocessor) -> None:
    request = _chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    items = _stream(r1, request, THOUGHT + '{"city": "Oslo"}')
    assert _reasoning(items).startswith("The user wants weather.") and _content(items) == ""
    arguments = "".join(piece.arguments for item in items for piece in item.tool_calls or ())
    assert json.loads(arguments) == {"city": "Oslo"}


def test_include_reasoning_false_hides_the_reasoning_and_the_logprobs(r1: Preprocessor) -> None:
    request = _chat(include_reasoning=False, logprobs=True)
    preprocessed = r1.preprocess(request, "r1")
    # vLLM's: the engine constrains structured outputs from the first token then.
    assert preprocessed.reasoning_ended is True
    post = r1.postprocessor(request, preprocessed)
    ids = r1.tokenizer.encode(THOUGHT + "Sunny.", add_special_tokens=False)
    items = [
        post.process(
            EngineOutput(token_ids=[token], logprobs=[-0.5], finish_reason="length" if i == len(ids) - 1 else None)
        )
        for i, token in enumerate(ids)
    ]
    assert _reasoning(items) == "" and _content(items) == "Sunny."
    assert all(item.logprobs is None for item in items)


def test_the_engine_is_told_where_the_reasoning_ends_and_the_parsers_kwargs(r1: Preprocessor) -> None:
    request = _chat(chat_template_kwargs={"thinking": True})
    preprocessed = r1.preprocess(request, "r1")
    assert preprocessed.reasoning_ended is False  # the prompt holds no </think>
    assert preprocessed.reasoning_parser_kwargs == {
        "chat_template_kwargs": {"thinking": True, "add_generation_prompt": True, "continue_final_message": False}
    }


def test_a_parser_that_reasons_by_the_template_kwargs_gets_them(tiny_model: Path) -> None:
    # vLLM's deepseek_v3: DeepSeek-R1's split with `thinking`, all content without it.
    v3 = Preprocessor(tiny_model, reasoning_parser="deepseek_v3")
    plain = _stream(v3, _chat(), THOUGHT + "Hi.")
    assert (_reasoning(plain), _content(plain)) == ("", THOUGHT + "Hi.")
    assert plain[0].reasoning is None  # not split
    assert v3.preprocess(_chat(), "r1").reasoning_ended is True
    thinking = _stream(v3, _chat(chat_template_kwargs={"thinking": True}), THOUGHT + "Hi.")
    assert (_content(thinking), _reasoning(thinking)) == ("Hi.", "The user wants weather. Maybe 日本語 🙂?")


def test_completions_have_no_reasoning_split(r1: Preprocessor) -> None:
    request = parse_request(CompletionRequest, {"model": "tiny", "prompt": "hi", "max_tokens": 50})
    assert r1.preprocess(request, "r1").reasoning_ended is None
    items = _stream(r1, request, THOUGHT + "Hi.")
    assert _content(items) == THOUGHT + "Hi." and all(item.reasoning is None for item in items)


def test_an_unknown_reasoning_parser_is_refused_naming_the_known_ones(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="deepseek_r1"):
        Preprocessor(tiny_model, reasoning_parser="no-such-parser")


def test_a_parser_whose_markers_the_tokenizer_lacks_is_refused_at_start(tiny_model: Path) -> None:
    # MiniMax M3's <mm:think> is no token of the tiny model's: vLLM's own start-up check.
    with pytest.raises(ValueError, match="minimax_m3"):
        Preprocessor(tiny_model, reasoning_parser="minimax_m3")


def test_an_earlier_answers_reasoning_reaches_the_template_under_both_names(
    r1: Preprocessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As vLLM's server passes it (a template may render it: interleaved thinking)."""
    template = (
        "{% for m in messages %}{{ m.role }}:{{ m.reasoning }}|{{ m.reasoning_content }}|{{ m.content }};{% endfor %}"
    )
    monkeypatch.setattr(r1.tokenizer, "chat_template", template)  # the tokenizer is shared: undone after
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Sunny.", "reasoning_content": "It is July."},
        {"role": "assistant", "content": "Rain.", "reasoning": "Clouds."},
    ]
    text = r1._render_chat(_chat(messages=history).messages)
    assert text == "user:||hi;assistant:It is July.|It is July.|Sunny.;assistant:Clouds.|Clouds.|Rain.;"
