import pytest

from app.errors import InvalidRequestError
from app.openai.schema import ChatCompletionRequest, CompletionRequest, parse_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": -1}, "n"),
        ({"n": 129}, "n"),
        ({"n": 2.0}, "n"),
        ({"n": "2"}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"frequency_penalty": 1e308}, "frequency_penalty"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"seed": 2**70}, "seed"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"model": None}, "model"),
    ],
)
def test_chat_errors_name_the_parameter(extra, param) -> None:
    with pytest.raises(InvalidRequestError) as error:
        parse_request(ChatCompletionRequest, {**CHAT, **extra})
    assert error.value.status == 400
    assert error.value.param == param
    assert param.split("[")[0].split(".")[0] in error.value.message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"suffix": "x"}, "suffix"),
        ({"suffix": "x", "echo": True}, "suffix"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 6}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1], []]}, "prompt[1]"),
        ({"prompt": [1, -2]}, "prompt[1]"),
        ({"prompt": [1, 2**40]}, "prompt[1]"),
        ({"best_of": 2}, "best_of"),
    ],
)
def test_completion_errors_name_the_parameter(extra, param) -> None:
    with pytest.raises(InvalidRequestError) as error:
        parse_request(CompletionRequest, {**COMPLETION, **extra})
    assert error.value.param == param


@pytest.mark.parametrize(
    "body",
    [b"{", b"[]", b'{"model": "m", "messages": [{"role": "user", "content": "\xff"}]}', b'{"model": "\\ud800"}', b""],
)
def test_unparseable_bodies_are_400s(body: bytes) -> None:
    with pytest.raises(InvalidRequestError) as error:
        parse_request(ChatCompletionRequest, body)
    assert error.value.status == 400 and error.value.param is None


def test_valid_requests_parse_from_bytes_and_after_a_hop() -> None:
    body = {
        **CHAT,
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "a"}]},
            {"role": "assistant", "tool_calls": [{"id": "1"}]},
            {"role": "tool", "content": "r", "tool_call_id": "1"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": "x",
        "top_k": 5,
        "ignore_eos": True,
    }
    import json

    parsed = parse_request(ChatCompletionRequest, json.dumps(body).encode())
    assert parse_request(ChatCompletionRequest, parsed.model_dump(exclude_unset=True)) == parsed
    assert parsed.stop_list() == ["x"] and parsed.include_usage_in_stream()
    completion = parse_request(CompletionRequest, {"model": "m", "prompt": [1, 2, 3]})
    assert completion.prompt_token_ids() == [1, 2, 3] and completion.max_tokens == 16


@pytest.mark.parametrize("request_type", [ChatCompletionRequest, CompletionRequest])
def test_n_is_an_int_from_1_to_128(request_type) -> None:
    body = CHAT if request_type is ChatCompletionRequest else COMPLETION
    assert [parse_request(request_type, {**body, "n": n}).num_choices() for n in (1, 2, 128)] == [1, 2, 128]
    # null is 1, as OpenAI's schema has it; left out, 1.
    assert parse_request(request_type, {**body, "n": None}).num_choices() == 1
    assert parse_request(request_type, body).num_choices() == 1
    with pytest.raises(InvalidRequestError) as error:
        parse_request(request_type, {**body, "n": 129})
    assert error.value.param == "n" and "128" in error.value.message
