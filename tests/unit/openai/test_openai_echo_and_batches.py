"""Completions with several prompts, `echo` (completions and chat) and `prompt_logprobs`,
through the HTTP layer over the real Preprocessor and Postprocessor (scripted tokens).

vLLM's own answers to the same fields are compared in the conformance tier
(tests/e2e/conformance_cases.py); these pin the Frontend's assembly: which choice gets
which prompt, what the usage counts, where the echo goes.
"""

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from app.openai import batch
from app.openai.schema import CompletionRequest, parse_request
from app.protocol import StreamItem
from tests.unit.openai.scripted_backend import MODEL, REPLY, choice_reply

PROMPTS = ["The first prompt", "A second, longer prompt than the first"]


def _events(response: httpx.Response) -> list[dict]:
    payloads = [frame.removeprefix("data: ") for frame in response.text.split("\n\n") if frame]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def _prompt_len(backend, prompt) -> int:
    request = parse_request(CompletionRequest, {"model": MODEL, "prompt": prompt})
    return len(backend.preprocessor.completion(request, "x").token_ids)


def test_a_request_names_each_of_its_prompts() -> None:
    def prompts(prompt):
        return parse_request(CompletionRequest, {"model": MODEL, "prompt": prompt}).prompts()

    assert prompts("one") == ["one"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]


async def test_each_prompt_is_a_request_of_its_own_and_its_choices_follow_the_previous_prompts(client, backend) -> None:
    body = {"model": MODEL, "prompt": PROMPTS, "n": 2, "temperature": 1.0, "max_tokens": 100}
    response = await client.post("/v1/completions", json=body, headers={"X-Request-Id": "batch-1"})
    assert response.status_code == 200, response.text
    answer = response.json()
    # Prompt p's choices are p * n + i: choice i's text, for each prompt.
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in answer["choices"]] == [REPLY, choice_reply(1), REPLY, choice_reply(1)]
    assert sorted(backend.request_ids) == ["batch-1-0", "batch-1-1"]
    prompt_tokens = sum(_prompt_len(backend, p) for p in PROMPTS)
    completion_tokens = 2 * (len(backend.reply_ids_of(0)) + len(backend.reply_ids_of(1)))
    assert answer["usage"]["prompt_tokens"] == prompt_tokens
    assert answer["usage"]["completion_tokens"] == completion_tokens


async def test_a_streamed_batch_counts_each_chunk_against_its_own_prompt(client, backend) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 100, "stream": True, "stream_options": options}
    chunks = _events(await client.post("/v1/completions", json=body))
    texts = ["", ""]
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        assert chunk["usage"]["prompt_tokens"] == _prompt_len(backend, PROMPTS[choice["index"]])
    assert texts == [REPLY, REPLY]
    assert chunks[-1]["usage"]["prompt_tokens"] == sum(_prompt_len(backend, p) for p in PROMPTS)


async def test_a_failing_prompt_fails_the_batch_and_closes_the_others() -> None:
    closed = asyncio.Event()

    class TwoPrompts:
        async def generate(self, kind, request, request_id) -> AsyncIterator[StreamItem]:
            if request_id.endswith("-1"):
                raise RuntimeError("worker gone")
            try:
                yield StreamItem(text="a")
                await asyncio.sleep(3600)
            finally:
                closed.set()

    request = parse_request(CompletionRequest, {"model": MODEL, "prompt": PROMPTS})
    items = batch.generate(TwoPrompts(), "completion", request, "r")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="worker gone"):
        async for _ in items:
            pass
    await asyncio.wait_for(closed.wait(), 5)


async def test_echo_puts_the_prompt_before_each_completion(client) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[0], "echo": True, "n": 2, "temperature": 1.0, "max_tokens": 100}
    answer = (await client.post("/v1/completions", json=body)).json()
    assert [c["text"] for c in answer["choices"]] == [PROMPTS[0] + REPLY, PROMPTS[0] + choice_reply(1)]
    chunks = _events(await client.post("/v1/completions", json={**body, "stream": True}))
    firsts: dict[int, dict] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        firsts.setdefault(choice["index"], choice)
    assert all(first["text"].startswith(PROMPTS[0]) for first in firsts.values())
    # As vLLM's server: the echoed prompt's token ids go with it.
    assert all(first["prompt_token_ids"][0] == 0 for first in firsts.values())


async def test_echo_with_no_tokens_answers_the_prompt_alone(client) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[0], "echo": True, "max_tokens": 0}
    (choice,) = (await client.post("/v1/completions", json=body)).json()["choices"]
    assert choice["text"] == PROMPTS[0] and choice["finish_reason"] == "length"
    chunks = _events(await client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPTS[0]


async def test_echo_with_logprobs_has_the_prompts_logprobs_first(client, backend) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[0], "echo": True, "logprobs": 1, "max_tokens": 100}
    (choice,) = (await client.post("/v1/completions", json=body)).json()["choices"]
    request = parse_request(CompletionRequest, {"model": MODEL, "prompt": PROMPTS[0]})
    prompt_ids = backend.preprocessor.completion(request, "x").token_ids
    logprobs = choice["logprobs"]
    texts = backend.preprocessor.token_texts
    assert logprobs["tokens"][: len(prompt_ids)] == [texts.get(t)[0] for t in prompt_ids]
    # Nothing predicts the first token; each other's top has itself and the best one.
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1 : len(prompt_ids)] == [-1.0] * (len(prompt_ids) - 1)
    assert logprobs["top_logprobs"][1] == {texts.get(prompt_ids[1])[0]: -1.0, texts.get(7)[0]: -0.5}
    assert len(logprobs["tokens"]) == len(prompt_ids) + len(backend.reply_ids)
    assert logprobs["text_offset"][1] == len(texts.get(prompt_ids[0])[0])
    # vLLM's prompt_logprobs beside them.
    assert choice["prompt_logprobs"][0] is None
    assert choice["prompt_logprobs"][1] == {
        str(prompt_ids[1]): {"logprob": -1.0, "rank": 3, "decoded_token": texts.get(prompt_ids[1])[0]},
        "7": {"logprob": -0.5, "rank": 1, "decoded_token": texts.get(7)[0]},
    }


async def test_prompt_logprobs_come_in_the_body(client, backend) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 1}
    answer = (await client.post("/v1/chat/completions", json=chat)).json()
    assert answer["prompt_logprobs"][0] is None and len(answer["prompt_logprobs"]) == answer["usage"]["prompt_tokens"]
    completion = {"model": MODEL, "prompt": PROMPTS, "prompt_logprobs": 0}
    choices = (await client.post("/v1/completions", json=completion)).json()["choices"]
    assert [len(c["prompt_logprobs"]) for c in choices] == [_prompt_len(backend, p) for p in PROMPTS]
    assert (
        "prompt_logprobs"
        not in (await client.post("/v1/completions", json={**completion, "prompt_logprobs": None})).json()["choices"][0]
    )


async def test_chat_echo_repeats_the_message_the_answer_continues(client) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}]
    body = {
        "model": MODEL,
        "messages": messages,
        "echo": True,
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    answer = (await client.post("/v1/chat/completions", json=body)).json()
    assert answer["choices"][0]["message"]["content"] == "Well," + REPLY
    chunks = _events(await client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Well,"}
    # A user's message is not the answer's to continue: nothing echoed.
    plain = {"model": MODEL, "messages": messages[:1], "echo": True}
    assert (await client.post("/v1/chat/completions", json=plain)).json()["choices"][0]["message"]["content"] == REPLY
