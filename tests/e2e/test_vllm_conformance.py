"""The conformance tier's comparison on hand-made bodies: it passes what vLLM's server and
Tandem really answer alike, and flags each kind of difference, so it cannot pass silently.

The tier itself runs in tests/e2e/test_agg_graph.py (`test_answers_as_vllms_own_server`),
on that module's graph: one engine start fewer than a graph of its own. No engine here.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.e2e.conformance import (
    ALLOWED,
    DONE,
    Allowed,
    Answer,
    Case,
    Deviation,
    Rule,
    TokenOf,
    assert_conforms,
    differences,
    merged_deltas,
    normalized_chunks,
    reassemble,
    resolve,
)
from tests.e2e.conformance_cases import TOOL_CALL_IDS

HEAD = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "tiny-llama"}
# As vLLM 0.32's server answers a greedy chat (its extras included).
VLLM_CHAT: dict[str, Any] = {
    **HEAD,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "cal side", "refusal": None, "reasoning": None},
            "logprobs": {
                "content": [
                    {"token": "cal", "logprob": -1.3973, "bytes": [99, 97, 108], "top_logprobs": []},
                    {"token": " side", "logprob": -0.9777, "bytes": [32, 115, 105, 100, 101], "top_logprobs": []},
                ]
            },
            "finish_reason": "length",
            "stop_reason": None,
            "token_ids": None,
        }
    ],
    "system_fingerprint": "vllm-0.32.0-e617d092",
    "usage": {"prompt_tokens": 17, "total_tokens": 19, "completion_tokens": 2, "prompt_tokens_details": None},
    "kv_transfer_params": None,
}
# As Tandem answers it.
TANDEM_CHAT: dict[str, Any] = {
    **HEAD,
    "id": "chatcmpl-2",
    "created": 2,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "cal side"},
            "logprobs": {
                "content": [
                    {"token": "cal", "logprob": -1.3973001, "bytes": [99, 97, 108], "top_logprobs": []},
                    {"token": " side", "logprob": -0.9777, "bytes": [32, 115, 105, 100, 101], "top_logprobs": []},
                ]
            },
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 17, "completion_tokens": 2, "total_tokens": 19, "prompt_tokens_details": None},
}


def whole(body: dict[str, Any], status: int = 200) -> Answer:
    return Answer(status, "application/json", body)


def edited(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `body` with the value at a dotted path (integers index lists) replaced."""
    copied = copy.deepcopy(body)
    *parents, last = path.split(".")
    node: Any = copied
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is KeyError:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return copied


def test_the_same_answer_with_allowed_differences_conforms() -> None:
    assert differences(whole(VLLM_CHAT), whole(TANDEM_CHAT)) == []


@pytest.mark.parametrize(
    ("path", "value", "flagged"),
    [
        ("choices.0.message.content", "cal sides", "choices[].message.content"),
        ("choices.0.finish_reason", "stop", "choices[].finish_reason"),
        ("object", "chat.completion.chunk", "object"),
        ("usage.completion_tokens", 3, "usage.completion_tokens"),
        ("choices.0.logprobs.content.1.token", " sid", "choices[].logprobs.content[].token"),
        ("choices.0.logprobs.content.1.logprob", -0.95, "choices[].logprobs.content[].logprob"),
        ("choices.0.logprobs.content.1.bytes", [32], "choices[].logprobs.content[].bytes"),
        # Shapes: a key missing, a key added, a type changed.
        ("choices.0.index", KeyError, "choices[].index"),
        ("choices.0.message.tool_calls", [], "choices[].message.tool_calls"),
        ("usage.prompt_tokens", 17.0, "usage.prompt_tokens"),
        ("choices.0.logprobs", None, "choices[].logprobs"),
    ],
)
def test_each_difference_is_flagged(path: str, value: Any, flagged: str) -> None:
    found = differences(whole(VLLM_CHAT), whole(edited(TANDEM_CHAT, path, value)))
    assert any(line.startswith(f"{flagged}:") for line in found), found


def test_a_key_only_vllm_has_is_flagged_unless_allowed() -> None:
    found = differences(whole(edited(VLLM_CHAT, "choices.0.message.tool_calls", [])), whole(TANDEM_CHAT))
    assert any(line.startswith("choices[].message.tool_calls:") for line in found), found


def test_a_vllm_only_null_key_with_a_value_is_flagged() -> None:
    # vLLM's `refusal` is allow-listed as always null: a refusal text is a difference.
    found = differences(whole(edited(VLLM_CHAT, "choices.0.message.refusal", "no")), whole(TANDEM_CHAT))
    assert any(line.startswith("choices[].message.refusal:") for line in found), found


def test_a_different_status_or_media_type_is_flagged() -> None:
    assert differences(whole(VLLM_CHAT), whole(TANDEM_CHAT, 400))[0].startswith("status:")
    html = Answer(200, "text/html", TANDEM_CHAT)
    assert differences(whole(VLLM_CHAT), html)[0].startswith("media type:")


def test_error_bodies_compare_by_shape() -> None:
    vllm = {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": None, "code": 404}}
    tandem = {
        "error": {"message": "no x", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    }
    assert differences(whole(vllm, 404), whole(tandem, 404)) == []
    lacking = {"error": {"message": "no x", "type": "invalid_request_error", "code": None}}
    assert any(line.startswith("error.param:") for line in differences(whole(vllm, 404), whole(lacking, 404)))
    empty = {"error": {"message": "", "type": "invalid_request_error", "param": None, "code": None}}
    assert differences(whole(vllm, 404), whole(empty, 404))


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "tiny-llama"}
    return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


# vLLM: the finish_reason on the last token's chunk; Tandem (as OpenAI): a chunk of its own.
VLLM_STREAM: list[Any] = [
    chunk({"role": "assistant", "content": ""}, prompt_token_ids=None),
    chunk({"content": "cal"}),
    chunk({"content": " side"}, "length", system_fingerprint="vllm-0.32.0"),
    DONE,
]
TANDEM_STREAM: list[Any] = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "cal"}),
    chunk({"content": " side"}),
    chunk({}, "length"),
    DONE,
]


def streamed(events: list[Any]) -> Answer:
    return Answer(200, "text/event-stream", events=events)


def test_streams_that_read_alike_conform() -> None:
    assert differences(streamed(VLLM_STREAM), streamed(TANDEM_STREAM)) == []
    folded = normalized_chunks(TANDEM_STREAM)
    assert len(folded) == 3 and folded[-1]["choices"][0]["finish_reason"] == "length"
    (choice,) = reassemble(folded)["choices"]
    assert choice["delta"] == {"role": "assistant", "content": "cal side"}


@pytest.mark.parametrize(
    ("events", "flagged"),
    [
        # Different text, put together.
        ([*TANDEM_STREAM[:2], chunk({"content": " sid"}), *TANDEM_STREAM[3:]], "reassembled: choices[].delta.content"),
        # Another finish_reason.
        ([*TANDEM_STREAM[:3], chunk({}, "stop"), DONE], "reassembled: choices[].finish_reason"),
        # A key vLLM's chunks lack.
        ([chunk({"role": "assistant", "content": ""}, extra=1), *TANDEM_STREAM[1:]], "chunks: extra"),
        # A chunk's header value.
        ([*TANDEM_STREAM[:1], {**TANDEM_STREAM[1], "object": "chat.completion"}, *TANDEM_STREAM[2:]], "chunks: object"),
        # No [DONE].
        (TANDEM_STREAM[:-1], "Tandem's stream does not end"),
        # An error event mid-stream.
        ([*TANDEM_STREAM[:2], {"error": {"message": "x", "type": "server_error"}}, DONE], "Tandem's stream has error"),
    ],
)
def test_each_stream_difference_is_flagged(events: list[Any], flagged: str) -> None:
    found = differences(streamed(VLLM_STREAM), streamed(events))
    assert any(line.startswith(flagged) for line in found), found


def test_a_deviation_asserts_both_servers_answers() -> None:
    case = Case("x", "/v1/completions", {}, deviation=Deviation(200, 400, "max_token"))
    refused = whole(
        {"error": {"message": "no", "type": "invalid_request_error", "param": "max_token", "code": None}}, 400
    )
    assert_conforms(case, whole(VLLM_CHAT), refused)
    with pytest.raises(AssertionError, match="vLLM's server answers otherwise"):
        assert_conforms(case, refused, refused)
    with pytest.raises(AssertionError):
        assert_conforms(case, whole(VLLM_CHAT), whole(TANDEM_CHAT))


def test_a_case_ending_otherwise_than_it_says_fails() -> None:
    case = Case("x", "/v1/chat/completions", {}, finish_reason="stop")
    with pytest.raises(AssertionError):
        assert_conforms(case, whole(VLLM_CHAT), whole(TANDEM_CHAT))


def test_reasoning_content_must_repeat_reasoning_which_vllm_calls_it() -> None:
    """Tandem's `reasoning_content` (DeepSeek's name), beside vLLM 0.32's `reasoning`."""
    vllm = whole(edited(VLLM_CHAT, "choices.0.message.reasoning", "hm"))
    tandem = edited(TANDEM_CHAT, "choices.0.message.reasoning", "hm")
    assert differences(vllm, whole(edited(tandem, "choices.0.message.reasoning_content", "hm"))) == []
    found = differences(vllm, whole(edited(tandem, "choices.0.message.reasoning_content", "other")))
    assert any(line.startswith("choices[].message.reasoning_content:") for line in found), found
    # In a stream, the deltas put together.
    vllm_stream = [VLLM_STREAM[0], chunk({"reasoning": "h"}), chunk({"reasoning": "m"}), *VLLM_STREAM[1:]]
    pieces = [chunk({"reasoning": "h", "reasoning_content": "h"}), chunk({"reasoning": "m", "reasoning_content": "x"})]
    assert differences(streamed(vllm_stream), streamed([TANDEM_STREAM[0], pieces[0], *TANDEM_STREAM[1:]])) != []
    assert differences(streamed(vllm_stream), streamed([TANDEM_STREAM[0], *pieces, *TANDEM_STREAM[1:]])) != []
    pieces[1]["choices"][0]["delta"]["reasoning_content"] = "m"
    assert differences(streamed(vllm_stream), streamed([TANDEM_STREAM[0], *pieces, *TANDEM_STREAM[1:]])) == []


def test_a_case_that_needs_a_key_fails_where_vllm_leaves_it_empty() -> None:
    case = Case("x", "/v1/chat/completions", {}, nonempty=("content",))
    assert_conforms(case, whole(VLLM_CHAT), whole(TANDEM_CHAT))
    with pytest.raises(AssertionError, match="no reasoning from vLLM"):
        assert_conforms(
            Case("x", "/v1/chat/completions", {}, nonempty=("reasoning",)), whole(VLLM_CHAT), whole(TANDEM_CHAT)
        )
    with pytest.raises(AssertionError, match="no content from vLLM"):
        assert_conforms(case, whole({**VLLM_CHAT, "choices": []}), whole({**TANDEM_CHAT, "choices": []}))
    assert_conforms(case, streamed(VLLM_STREAM), streamed(TANDEM_STREAM))


class _Tokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return {" the": [7], " two words": [8, 9]}[text]


def test_token_placeholders_resolve_in_values_and_logit_bias_keys() -> None:
    body = {"logit_bias": {TokenOf(" the"): 100}, "allowed_token_ids": [TokenOf(" the"), 3]}
    assert resolve(body, _Tokenizer()) == {"logit_bias": {"7": 100}, "allowed_token_ids": [7, 3]}
    with pytest.raises(AssertionError, match="not one"):
        resolve([TokenOf(" two words")], _Tokenizer())


def test_a_trailing_unfinished_character_is_a_difference() -> None:
    # Tandem's detokenizer leaves it out at the end, as vLLM's (app/preprocess/detokenizer.py).
    path = "choices.0.message.content"
    assert differences(whole(VLLM_CHAT), whole(edited(TANDEM_CHAT, path, "cal side\ufffd")))


def test_a_cases_own_allowance_applies_to_that_case_only() -> None:
    path = "choices.0.logprobs.content.0.top_logprobs"
    vllm = whole(edited(VLLM_CHAT, path, [{"token": "cal", "logprob": -1.3973, "bytes": [99, 97, 108]}]))
    tandem = whole(edited(TANDEM_CHAT, path, [{"token": "x", "logprob": -1.0, "bytes": [120]}]))
    allowance = Allowed("choices[].logprobs.content[].top_logprobs", Rule.VALUE_MAY_DIFFER, "test")
    assert_conforms(Case("x", "/v1/chat/completions", {}, allowed=(allowance,)), vllm, tandem)
    with pytest.raises(AssertionError, match="top_logprobs"):
        assert_conforms(Case("x", "/v1/chat/completions", {}), vllm, tandem)


def completion_chunk(text: str, finish: str | None = None, top: dict[str, float] | None = None) -> dict[str, Any]:
    logprobs = None if top is None else {"tokens": [text], "token_logprobs": [-1.0], "top_logprobs": [top]}
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return {"id": "c", "object": "text_completion", "created": 1, "model": "tiny-llama", "choices": [choice]}


def test_completion_streams_compare_top_logprobs_by_token_and_skip_empty_chunks() -> None:
    # vLLM's completions send a chunk for each token of empty text; Tandem sends none.
    vllm = [completion_chunk("a"), completion_chunk(""), completion_chunk(""), completion_chunk("b", "length"), DONE]
    tandem = [completion_chunk("a"), completion_chunk("b"), completion_chunk("", "length"), DONE]
    assert differences(streamed(vllm), streamed(tandem)) == []
    with_top = [completion_chunk("a", "length", {"a": -1.0, "b": -2.0}), DONE]
    other_top = [completion_chunk("a", "length", {"a": -1.0, "c": -2.0}), DONE]
    found = differences(streamed(with_top), streamed(other_top))
    assert any(line.startswith("reassembled: choices[].logprobs.top_logprobs[]: keys") for line in found), found


# --- /v1/responses ---------------------------------------------------------------------------------


def response_body(text: str, *, vllm: bool, status: str = "incomplete") -> dict[str, Any]:
    """A Response as each server shapes it (vLLM's extras on its side; ids and times its own)."""
    item: dict[str, Any] = {
        "id": "msg_a" if vllm else "msg_b",
        "content": [{"annotations": [], "text": text, "type": "output_text", "logprobs": None}],
        "role": "assistant",
        "status": "completed",
        "type": "message",
    }
    details: dict[str, Any] = {"cached_tokens": 0}
    if vllm:
        item["phase"] = None
        details.update(cache_write_tokens=0, input_tokens_per_turn=[], cached_tokens_per_turn=[])
    body: dict[str, Any] = {
        "id": "resp_a" if vllm else "resp_b",
        "created_at": 1 if vllm else 2,
        "object": "response",
        "model": "tiny-llama",
        "output": [item] if text else [],
        "status": status,
        "usage": {"input_tokens": 17, "input_tokens_details": details, "output_tokens": 2, "total_tokens": 19},
    }
    if vllm:
        body.update(kv_transfer_params=None, input_messages=None, output_messages=None)
    return body


def response_events(deltas: list[str], *, vllm: bool) -> list[dict[str, Any]]:
    """A Responses stream as each server sends it: its text cut into `deltas`."""
    text, done = "".join(deltas), response_body("".join(deltas), vllm=vllm)
    started = {**done, "output": [], "status": "in_progress", "usage": None}
    item, item_id = done["output"][0], done["output"][0]["id"]
    part, where = item["content"][0], {"output_index": 0, "item_id": item_id, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**item, "content": [], "status": "in_progress"},
        },
        {"type": "response.content_part.added", **where, "part": {**part, "text": "", "logprobs": []}},
        *({"type": "response.output_text.delta", **where, "delta": delta, "logprobs": []} for delta in deltas),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": done},
    ]
    return numbered(events)


def numbered(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**event, "sequence_number": number} for number, event in enumerate(events)]


def test_responses_that_read_alike_conform() -> None:
    assert differences(whole(response_body("cal side", vllm=True)), whole(response_body("cal side", vllm=False))) == []
    # Cut into other deltas (so numbered otherwise), with other ids: the same stream.
    vllm, tandem = response_events(["cal", " side"], vllm=True), response_events(["c", "al", " side"], vllm=False)
    assert differences(streamed(vllm), streamed(tandem)) == []
    (delta,) = [event for event in merged_deltas(tandem) if event["type"] == "response.output_text.delta"]
    assert delta["delta"] == "cal side"


TANDEM_EVENTS = response_events(["c", "al", " side"], vllm=False)


@pytest.mark.parametrize(
    ("events", "flagged"),
    [
        # Different text, in the deltas and everything after them.
        (response_events(["cal", " sid"], vllm=False), "response.output_text.delta: delta"),
        # An event missing.
        (numbered([e for e in TANDEM_EVENTS if e["type"] != "response.content_part.added"]), "event types"),
        # Numbered otherwise.
        ([{**TANDEM_EVENTS[0], "sequence_number": 1}, *TANDEM_EVENTS[1:]], "Tandem's events are not numbered"),
        # A key vLLM's events lack.
        ([{**TANDEM_EVENTS[0], "extra": 1}, *TANDEM_EVENTS[1:]], "response.created: extra"),
        # Another status at the end.
        (
            [
                *TANDEM_EVENTS[:-1],
                {**TANDEM_EVENTS[-1], "response": response_body("cal side", vllm=False, status="completed")},
            ],
            "response.completed: response.status",
        ),
        # No response.completed.
        (TANDEM_EVENTS[:-1], "Tandem's stream does not end with response.completed"),
        # An error event.
        (numbered([*TANDEM_EVENTS[:4], {"type": "error", "message": "x", "code": None}]), "Tandem's stream has error"),
    ],
)
def test_each_responses_stream_difference_is_flagged(events: list[Any], flagged: str) -> None:
    found = differences(streamed(response_events(["cal", " side"], vllm=True)), streamed(events))
    assert any(line.startswith(flagged) for line in found), found


# --- streamed tool calls -----------------------------------------------------------------------------


def call_piece(index: int, arguments: str, name: str | None = None, *, vllm: bool = False) -> dict[str, Any]:
    """One piece of a "required" stream's call: its first (with `name`) or a later one, as
    each server sends it (a later one says "name": null on both)."""
    if name is not None:
        function = {"name": name, "arguments": arguments}
        return {"index": index, "id": f"chatcmpl-tool-{index}{vllm}", "type": "function", "function": function}
    return {"index": index, "function": {"name": None, "arguments": arguments}}


def calls_stream(pieces: list[list[dict[str, Any]]], finish: str = "tool_calls") -> list[Any]:
    return [
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"tool_calls": each}) for each in pieces),
        chunk({}, finish),
        DONE,
    ]


# A "required" stream of two calls, as vLLM's server sends it, token by token.
VLLM_CALLS = calls_stream(
    [
        [call_piece(0, '{"', "get_weather", vllm=True)],
        [call_piece(0, 'city": ', vllm=True)],
        [call_piece(0, '"Oslo"}', vllm=True), call_piece(1, "{}", "get_time", vllm=True)],
    ]
)


def test_a_required_stream_cut_otherwise_conforms() -> None:
    tandem = calls_stream(
        [
            [call_piece(0, "{", "get_weather")],
            [call_piece(0, '"city": "Oslo"')],
            [call_piece(0, "}")],
            [call_piece(1, "{}", "get_time")],
        ]
    )
    assert differences(streamed(VLLM_CALLS), streamed(tandem), ALLOWED + TOOL_CALL_IDS) == []


@pytest.mark.parametrize(
    ("pieces", "flagged"),
    [
        # Held back: each call's arguments whole in one piece, at its end (Tandem before it
        # streamed "required" calls as vLLM does).
        ([[call_piece(0, '{"city": "Oslo"}', "get_weather")], [call_piece(1, "{}", "get_time")]], "tool call (0, 0)"),
        # A later piece that names its call again.
        (
            [
                [call_piece(0, '{"city": ', "get_weather")],
                [{"index": 0, "function": {"name": "get_weather", "arguments": '"Oslo"}'}}],
                [call_piece(1, "{}", "get_time")],
            ],
            "Tandem's stream: a later piece of call 0",
        ),
        # Later pieces that leave "name" out, where vLLM's say "name": null.
        (
            [
                [call_piece(0, '{"city": ', "get_weather")],
                [{"index": 0, "function": {"arguments": '"Oslo"}'}}],
                [call_piece(1, "{}", "get_time")],
            ],
            "chunks: choices[].delta.tool_calls[].function.name",
        ),
        # A call announced without its id.
        (
            [
                [call_piece(0, '{"city": ', "get_weather")],
                [call_piece(0, '"Oslo"}')],
                [{"index": 1, "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
            ],
            "Tandem's stream: call 1 of choice 0 begins without",
        ),
        # The calls announced out of order.
        (
            [
                [call_piece(1, "{}", "get_time")],
                [call_piece(0, '{"city": ', "get_weather")],
                [call_piece(0, '"Oslo"}')],
            ],
            "Tandem's stream: choice 0 announces its calls in the order [1, 0]",
        ),
        # Other text (under greedy decoding the same text is required, not the same JSON).
        (
            [[call_piece(0, '{"city":', "get_weather")], [call_piece(0, '"Oslo"}')], [call_piece(1, "{}", "get_time")]],
            "reassembled: choices[].delta.tool_calls[].function.arguments",
        ),
    ],
)
def test_each_tool_call_stream_difference_is_flagged(pieces: list[list[dict[str, Any]]], flagged: str) -> None:
    found = differences(streamed(VLLM_CALLS), streamed(calls_stream(pieces)), ALLOWED + TOOL_CALL_IDS)
    assert any(line.startswith(flagged) for line in found), found
