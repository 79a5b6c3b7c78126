"""tool_choice "required" in a stream: each call's arguments go out as the model writes them,
as vLLM 0.32's server streams them (vllm/tool_parsers/streaming.py,
`extract_required_tool_call_streaming`); the expected deltas here are what that function
returns for the same pieces of text."""

from __future__ import annotations

import json
import re
from typing import Any

from app.openai.schema import ChatCompletionRequest, parse_request
from app.preprocess import Preprocessor
from app.preprocess.tools import StreamedRequiredCallsReader
from app.protocol import EngineOutput, StreamItem

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
# Spaced otherwise than json.dumps: what the model wrote shows in a stream, not in a whole answer.
CALLS = (
    '[{"name": "get_weather", "parameters": {"city":"Été",  "n": [1, {"x": "}]"}]}},'
    ' {"name": "get_time", "parameters": {}}]'
)
VLLM_ID = re.compile(r"chatcmpl-tool-[0-9a-f]{16}")


def _pieces(reader: StreamedRequiredCallsReader, pieces: list[str]) -> list[list[tuple[int, bool, str | None, str]]]:
    """Each piece's deltas as (call index, has an id, name, arguments)."""
    out = []
    for piece in pieces:
        content, deltas = reader.feed(piece)
        assert content == ""
        out.append([(d.index, d.id is not None, d.name, d.arguments) for d in deltas])
    return out


def test_a_call_is_announced_once_its_parameters_begin_and_then_grows_piece_by_piece() -> None:
    pieces = ['[{"', "name", '":', ' "get', "_weather", '",', ' "parameters', '":', ' {"', "city", '":', ' "Oslo', '",']
    pieces += [
        ' "note": "a}]\\"',
        'b"}}, {"parameters": {}, "name": "get_time"}]',
        ' [{"name": "x", "parameters": {}}]',
    ]
    reader = StreamedRequiredCallsReader()
    assert _pieces(reader, pieces) == [
        *([] for _ in range(8)),  # no call before its name is whole and its parameters begin
        [(0, True, "get_weather", '{"')],
        [(0, False, None, "city")],
        [(0, False, None, '":')],
        [(0, False, None, ' "Oslo')],
        [(0, False, None, '",')],
        # Brackets and quotes inside a string are its text, not the array's.
        [(0, False, None, ' "note": "a}]\\"')],
        # One piece that ends one call and holds another whole (its name after its parameters).
        [(0, False, None, 'b"}'), (1, True, "get_time", "{}")],
        [],  # after the array's end nothing is read
    ]
    assert reader.called


def test_a_text_cut_off_mid_call_streams_the_arguments_written_so_far() -> None:
    # As vLLM's stream; a whole answer has only the complete calls (RequiredCallsReader).
    pieces = ['[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "par', 'ameters": {"y": ', "2"]
    assert _pieces(StreamedRequiredCallsReader(), pieces) == [
        [(0, True, "a", '{"x": 1}')],
        [(1, True, "b", '{"y": ')],
        [(1, False, None, "2")],
    ]


def test_text_that_is_no_array_of_calls_makes_no_call() -> None:
    for text in ('{"name": "a", "parameters": {}}', '[["a"]]', '[{"name": 3, "parameters": {}}]'):
        reader = StreamedRequiredCallsReader()
        assert _pieces(reader, [text]) == [[]] and not reader.called


def _chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(ChatCompletionRequest, body)


def _token_stream(preprocessor: Preprocessor, request: ChatCompletionRequest, text: str) -> list[StreamItem]:
    """The items of `text` from a fake engine, a token an output, ending with EOS (finish "stop")."""
    post = preprocessor.postprocessor(request, preprocessor.preprocess(request, "r1"))
    ids = [*preprocessor.tokenizer.encode(text, add_special_tokens=False), preprocessor.eos_token_ids[0]]
    return [
        post.process(EngineOutput(token_ids=[token], finish_reason="stop" if i == len(ids) - 1 else None))
        for i, token in enumerate(ids)
    ]


def test_a_streamed_required_answer_sends_each_calls_arguments_as_written(preprocessor: Preprocessor) -> None:
    items = _token_stream(preprocessor, _chat(tools=[WEATHER, TIME], tool_choice="required", stream=True), CALLS)
    assert all(item.text == "" for item in items)  # the whole text is calls, not content
    pieces = [delta for item in items for delta in item.tool_calls or ()]
    heads = [piece for piece in pieces if piece.id is not None]
    # Each call's first piece has its id (vLLM's form) and name, and comes before its others.
    assert [(head.index, head.name) for head in heads] == [(0, "get_weather"), (1, "get_time")]
    assert all(VLLM_ID.fullmatch(head.id or "") for head in heads) and heads[0].id != heads[1].id
    assert all(piece.name is None for piece in pieces if piece.id is None)
    assert [piece.index for piece in pieces] == sorted(piece.index for piece in pieces)
    first_call = [piece for piece in pieces if piece.index == 0]
    assert first_call[0] is heads[0] and len(first_call) > 5  # token by token, not at the end
    arguments = ["".join(p.arguments for p in pieces if p.index == index) for index in (0, 1)]
    assert arguments == ['{"city":"Été",  "n": [1, {"x": "}]"}]}', "{}"]
    assert items[-1].finish_reason == "tool_calls"


def test_a_whole_required_answer_still_gives_each_call_whole_and_re_serialized(preprocessor: Preprocessor) -> None:
    request = _chat(tools=[WEATHER, TIME], tool_choice="required")
    items = _token_stream(preprocessor, request, CALLS)
    pieces = [delta for item in items for delta in item.tool_calls or ()]
    # As vLLM's whole answer: json.dumps of each call's parameters.
    assert [(p.index, p.name, p.arguments) for p in pieces] == [
        (0, "get_weather", json.dumps({"city": "Été", "n": [1, {"x": "}]"}]}, ensure_ascii=False)),
        (1, "get_time", "{}"),
    ]
