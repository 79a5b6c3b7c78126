"""n > 1 choices through the HTTP layer: each choice's own text, logprobs and finish reason,
under its index, streamed as vLLM's server streams them and whole; usage sums the choices."""

import json

import httpx

from app.openai.render import ChatRenderer, ChoiceParts, CompletionRenderer
from app.openai.schema import ChatCompletionRequest, parse_request
from app.protocol import TokenLogprobs
from tests.unit.openai.scripted_backend import MODEL, choice_reply

N = 3
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": N, "temperature": 0.7}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 100, "n": N, "temperature": 0.7}


def _events(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    payloads = [frame.removeprefix("data: ") for frame in response.text.split("\n\n")[:-1]]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def _prompt_tokens(backend) -> int:
    return len(backend.preprocessor.chat(parse_request(ChatCompletionRequest, CHAT), "x").token_ids)


async def test_chat_whole_body_lists_the_choices_in_index_order(client, backend) -> None:
    body = (await client.post("/v1/chat/completions", json=CHAT)).json()
    assert body["choices"] == [
        {
            "index": index,
            "message": {"role": "assistant", "content": choice_reply(index)},
            "logprobs": None,
            "finish_reason": "stop",
        }
        for index in range(N)
    ]
    # The prompt counted once, the completion tokens of every choice.
    completion_tokens = sum(len(backend.reply_ids_of(index)) for index in range(N))
    assert body["usage"] == {
        "prompt_tokens": _prompt_tokens(backend),
        "completion_tokens": completion_tokens,
        "total_tokens": _prompt_tokens(backend) + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_chat_stream_sends_every_role_chunk_first_and_a_finish_per_choice(client, backend) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    chunks = _events(await client.post("/v1/chat/completions", json=body))
    # As vLLM: each choice's role chunk, in index order, before any content.
    assert [c["choices"] for c in chunks[:N]] == [
        [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        for index in range(N)
    ]
    choices = [c["choices"][0] for c in chunks[N:-1]]
    assert len({c["index"] for c in choices[: 2 * N]}) > 1, "the choices' tokens arrive interleaved"
    for index in range(N):
        own = [c for c in choices if c["index"] == index]
        assert "".join(c["delta"].get("content", "") for c in own) == choice_reply(index)
        assert [c["finish_reason"] for c in own if c["finish_reason"]] == ["stop"]
        assert own[-1] == {"index": index, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    # Usage (then [DONE]) after the last choice finished, summed over the choices.
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == sum(len(backend.reply_ids_of(i)) for i in range(N))
    assert chunks[-1]["usage"]["prompt_tokens"] == _prompt_tokens(backend)


async def test_a_stop_string_ends_one_choice_and_the_others_run_on(client) -> None:
    # Only choice 2's text holds it.
    body = {**CHAT, "stop": ["2: Hello"]}
    whole = (await client.post("/v1/chat/completions", json=body)).json()
    assert [(c["message"]["content"], c["finish_reason"]) for c in whole["choices"]] == [
        (choice_reply(0), "stop"),
        (choice_reply(1), "stop"),
        ("Choice ", "stop"),
    ]
    chunks = _events(await client.post("/v1/chat/completions", json={**body, "stream": True}))
    texts = [
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"][0]["index"] == index)
        for index in range(N)
    ]
    assert texts == [choice_reply(0), choice_reply(1), "Choice "]


async def test_max_tokens_holds_for_each_choice(client) -> None:
    whole = (await client.post("/v1/completions", json={**COMPLETION, "max_tokens": 4})).json()
    assert [c["finish_reason"] for c in whole["choices"]] == ["length"] * N
    assert whole["usage"]["completion_tokens"] == 4 * N


async def test_completion_logprobs_text_offsets_are_per_choice(client, backend) -> None:
    body = {**COMPLETION, "n": 2, "logprobs": 1}
    whole = (await client.post("/v1/completions", json=body)).json()
    chunks = _events(await client.post("/v1/completions", json={**body, "stream": True}))
    for index in range(2):
        logprobs = whole["choices"][index]["logprobs"]
        assert whole["choices"][index]["index"] == index
        offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
        assert offsets[0] == 0 and len(offsets) == len(backend.reply_ids_of(index))
        assert offsets == [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
        streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["index"] == index]
        streamed_offsets = [offset for lp in streamed if lp for offset in lp["text_offset"]]
        assert streamed_offsets == offsets


async def test_continuous_usage_counts_the_chunks_choice(client, backend) -> None:
    body = {
        **COMPLETION,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    chunks = _events(await client.post("/v1/completions", json=body))
    for index in range(2):
        counts = [c["usage"]["completion_tokens"] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert counts == sorted(counts) and counts[-1] == len(backend.reply_ids_of(index))
    assert chunks[-1]["usage"]["completion_tokens"] == sum(len(backend.reply_ids_of(i)) for i in range(2))


def _parts(text: str, finish_reason: str = "stop") -> ChoiceParts:
    parts = ChoiceParts()
    parts.add(text, None, None)
    parts.finish_reason = finish_reason
    return parts


def test_renderers_name_the_choice_of_each_chunk() -> None:
    entry = TokenLogprobs("ab", [97, 98], -0.5, [])
    chat = ChatRenderer("chatcmpl-1", MODEL, 1, include_usage=False)
    assert chat.role_chunk(2)["choices"][0]["index"] == 2
    assert chat.content_chunk("x", None, 1)["choices"][0] == {
        "index": 1,
        "delta": {"content": "x"},
        "logprobs": None,
        "finish_reason": None,
    }
    assert chat.finish_chunk("length", 4)["choices"][0]["index"] == 4
    body = chat.body([chat.choice(i, _parts(f"t{i}")) for i in range(2)], {})
    assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [(0, "t0"), (1, "t1")]
    completion = CompletionRenderer("cmpl-1", MODEL, 1, include_usage=False)
    # Each choice's text starts at offset 0.
    offsets = [
        completion.content_chunk("ab", [entry], index)["choices"][0]["logprobs"]["text_offset"]
        for index in (0, 1, 0, 1, 1)
    ]
    assert offsets == [[0], [0], [2], [2], [4]]
