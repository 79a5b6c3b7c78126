"""vLLM's extra request fields: accepted with vLLM's meaning, refused where vLLM refuses them."""

from __future__ import annotations

import json

import httpx
import pytest

from app.errors import InvalidRequestError
from app.openai.schema import ChatCompletionRequest, CompletionRequest, parse_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}

SAMPLING_FIELDS = {
    "logit_bias": {"5": 100, "7": -250.5},
    "repetition_penalty": 1.3,
    "min_p": 0.05,
    "top_k": 40,
    "min_tokens": 2,
    "seed": -(2**63),
    "stop_token_ids": [3, 4],
    "bad_words": ["foo", "bar baz"],
    "allowed_token_ids": [5, 6, 7],
    "skip_special_tokens": False,
    "spaces_between_special_tokens": False,
    "include_stop_str_in_output": True,
    "ignore_eos": True,
    "length_penalty": 0.7,
    "user": "someone",
    "metadata": {"k": "v"},
    "prompt_logprobs": None,
    "stream": True,
    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
}
CHAT_ONLY = {
    "chat_template_kwargs": {"enable_thinking": False},
    "add_generation_prompt": False,
    "continue_final_message": True,
    "add_special_tokens": True,
}


def test_every_field_is_accepted_and_survives_a_hop() -> None:
    """Both endpoints take them; after the hop to a Processor (a dict) the request is the same."""
    chat = parse_request(ChatCompletionRequest, json.dumps({**CHAT, **SAMPLING_FIELDS, **CHAT_ONLY}).encode())
    completion = parse_request(
        CompletionRequest, json.dumps({**COMPLETION, **SAMPLING_FIELDS, "add_special_tokens": False}).encode()
    )
    for parsed in (chat, completion):
        assert parse_request(type(parsed), parsed.model_dump(exclude_unset=True)) == parsed
        assert parsed.logit_bias_by_id() == {5: 100.0, 7: -100.0}  # clamped, as vLLM does
        assert parsed.continuous_usage_in_stream()
    assert chat.chat_template_kwargs == {"enable_thinking": False} and not chat.add_generation_prompt
    assert not completion.add_special_tokens


def test_a_reasoning_effort_reaches_the_chat_template_as_vllm_merges_it() -> None:
    def variables(**fields: object) -> dict | None:
        return parse_request(ChatCompletionRequest, {**CHAT, **fields}).template_variables()

    assert variables() is None
    assert variables(chat_template_kwargs={"x": 1}) == {"x": 1}
    assert variables(reasoning_effort="low") == {"reasoning_effort": "low", "enable_thinking": True}
    # The request's effort wins over the kwargs'; the kwargs' enable_thinking over the effort's.
    both = {"reasoning_effort": "high", "enable_thinking": True}
    assert variables(reasoning_effort="none", chat_template_kwargs=both) == {
        "reasoning_effort": "none",
        "enable_thinking": True,
    }
    assert variables(reasoning_effort="none") == {"reasoning_effort": "none", "enable_thinking": False}


def test_defaults_are_vllms() -> None:
    chat = parse_request(ChatCompletionRequest, CHAT)
    completion = parse_request(CompletionRequest, COMPLETION)
    assert chat.add_generation_prompt and not chat.continue_final_message
    assert not chat.add_special_tokens and completion.add_special_tokens
    for parsed in (chat, completion):
        assert parsed.skip_special_tokens and parsed.spaces_between_special_tokens
        assert not parsed.include_stop_str_in_output and parsed.bad_words == []
        assert parsed.logit_bias_by_id() is None and not parsed.continuous_usage_in_stream()


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"repetition_penalty": -1.5}, "repetition_penalty", "greater than 0"),
        ({"min_p": 2}, "min_p", "less than or equal to 1"),
        ({"min_p": -0.1}, "min_p", "greater than or equal to 0"),
        ({"logit_bias": {"x1": 2}}, "logit_bias", "cannot be converted to integer token IDs: ['x1']"),
        ({"logit_bias": {"-3": 2}}, "logit_bias", "[-3]"),
        ({"logit_bias": {"3": "big"}}, "logit_bias.3", ""),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]", ""),
        ({"allowed_token_ids": []}, "allowed_token_ids", ""),
        ({"allowed_token_ids": [2**40]}, "allowed_token_ids[0]", ""),
        ({"bad_words": ["ok", ""]}, "bad_words", "cannot contain an empty string"),
        ({"bad_words": None}, "bad_words", ""),
        ({"seed": 2**63}, "seed", ""),
        ({"length_penalty": "long"}, "length_penalty", ""),
        ({"prompt_logprobs": -2}, "prompt_logprobs", "must be a positive value or -1"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "not available when `stream=True`"),
        (
            {"stream": True, "stream_options": {"continuous_usage_stats": 1}},
            "stream_options.continuous_usage_stats",
            "",
        ),
        ({"metadata": {"k": 1}}, "metadata.k", ""),
        ({"use_beam_search": True}, "use_beam_search", "Unrecognized request argument supplied"),
    ],
)
@pytest.mark.parametrize("endpoint", [(ChatCompletionRequest, CHAT), (CompletionRequest, COMPLETION)])
def test_bad_values_are_400s_naming_the_field(endpoint, extra, param, says) -> None:
    request_type, base = endpoint
    with pytest.raises(InvalidRequestError) as error:
        parse_request(request_type, {**base, **extra})
    assert error.value.status == 400 and error.value.param == param
    assert param.split("[")[0].split(".")[0] in error.value.message and says in error.value.message


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"continue_final_message": True}, "continue_final_message", "Cannot set both"),
        (
            {"continue_final_message": True, "add_generation_prompt": True},
            "continue_final_message",
            "Cannot set both",
        ),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", "['tokenize']"),
        ({"chat_template_kwargs": {"chat_template": "{{ x }}"}}, "chat_template_kwargs", "unexpected"),
        ({"chat_template_kwargs": []}, "chat_template_kwargs", ""),
    ],
)
def test_bad_chat_template_inputs_are_400s(extra, param, says) -> None:
    with pytest.raises(InvalidRequestError) as error:
        parse_request(ChatCompletionRequest, {**CHAT, **extra})
    assert error.value.param == param and says in error.value.message


@pytest.mark.parametrize("field", ["chat_template_kwargs", "add_generation_prompt", "continue_final_message"])
def test_chat_template_inputs_are_not_completion_fields(field) -> None:
    with pytest.raises(InvalidRequestError, match="Unrecognized request argument supplied"):
        parse_request(CompletionRequest, {**COMPLETION, field: CHAT_ONLY[field]})


async def _events(client: httpx.AsyncClient, body: dict) -> list[dict]:
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: {")]
    return [json.loads(line) for line in lines]


async def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(client, backend) -> None:
    body = {**CHAT, "model": "tiny", "stream": True, "max_completion_tokens": 4}
    continuous = await _events(
        client, {**body, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    )
    prompt_tokens = continuous[-1]["usage"]["prompt_tokens"]
    assert prompt_tokens > 0
    # The role chunk counts the prompt only; then each chunk the tokens so far; the last is the usage chunk.
    assert continuous[0]["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 0,
        "total_tokens": prompt_tokens,
    }
    completion_counts = [chunk["usage"]["completion_tokens"] for chunk in continuous]
    assert completion_counts == sorted(completion_counts) and completion_counts[-2:] == [4, 4]
    assert all(
        chunk["usage"]["total_tokens"] == prompt_tokens + chunk["usage"]["completion_tokens"] for chunk in continuous
    )
    # Without include_usage, continuous_usage_stats does nothing (as in vLLM).
    plain = await _events(client, {**body, "stream_options": {"continuous_usage_stats": True}})
    assert all("usage" not in chunk for chunk in plain)
    only_final = await _events(client, {**body, "stream_options": {"include_usage": True}})
    assert [chunk["usage"] for chunk in only_final[:-1]] == [None] * (len(only_final) - 1)
