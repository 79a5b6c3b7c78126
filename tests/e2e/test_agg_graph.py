"""The seed's node 1 on the real stack: `tandem serve graphs.agg_router:Frontend` with two
vLLM CPU workers (pinned to separate cores), real NATS and etcd, the official openai client.

One graph serves the whole module. The reference outputs come from vLLM's offline `LLM`
on the same model, and the conformance tier's from vLLM's own OpenAI server
(tests/e2e/conformance.py): both run before the graph starts (two engines at once would
share cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from transformers import AutoTokenizer

from app.launch.ports import free_port
from app.protocol import LoadReport, names
from app.router.tunables import ROUTER_POLICY, LivePolicy
from app.runtime import Runtime
from testbed.graphs import TANDEM, ServedGraph, stop_process_tree
from tests.e2e.conformance import Answer, Case, assert_conforms, send
from tests.e2e.conformance_cases import CASES, MAX_MODEL_LEN
from tests.e2e.graph_configs import BLOCK_SIZE, MODEL, agg_router_config
from tests.e2e.graph_helpers import Stream, engine_core_of, migrations, read_stream
from tests.e2e.vllm_reference import ReferenceOutput, greedy, vllm_generate_choices
from tests.e2e.vllm_server import REASONING_PARSER, REASONING_PARSER_PLUGIN, TOOL_CALL_PARSER, vllm_server_answers
from tests.schema_bodies import SchemaBodies

pytestmark = pytest.mark.e2e

MAX_TOKENS = 16
# Far above a step of the tiny model here (milliseconds), short for the hung-engine test.
STALL_TIMEOUT_S = 10
ENGINE_ARGS = {"block_size": BLOCK_SIZE, "max_model_len": 4096, "enforce_eager": True, "dtype": "float32"}

CHATS = [
    [{"role": "user", "content": "In the heart of Eldoria, an ancient land of boundless magic, lies Aeloria."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "naïve café — 日本語 🙂 tell me more"},
    ],
]
COMPLETION_PROMPTS = ["def fibonacci(n):", "The quick brown fox"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    """Token ids of every prompt, the way the model's own template and tokenizer make them."""
    rendered = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in CHATS]
    chats = [tokenizer(text, add_special_tokens=False).input_ids for text in rendered]
    completions = [tokenizer(prompt).input_ids for prompt in COMPLETION_PROMPTS]
    return [list(ids) for ids in chats + completions]


# vLLM's extra fields, each a greedy request whose output it changes in a way vLLM defines:
# sent to Tandem as the request's fields, to vLLM as its SamplingParams' (FIELD_CASES).
FIELD_CASE_NAMES = (
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "repetition_penalty",
    "min_tokens",
    "stop_token_ids",
    "stop_token_ids_included",
    "stop_string_included",
    "special_tokens_kept",
)


@pytest.fixture(scope="module")
def field_cases(tokenizer) -> dict[str, dict[str, Any]]:
    (the,) = tokenizer(" the", add_special_tokens=False).input_ids
    header = tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    every_third = list(range(5, len(tokenizer), 3))
    cases: dict[str, dict[str, Any]] = {
        "logit_bias": {"logit_bias": {str(the): 100}},
        "allowed_token_ids": {"allowed_token_ids": [the, 10, 20, 30, 40]},
        # The forced token is a bad word: the ban wins.
        "bad_words": {"logit_bias": {str(the): 100}, "bad_words": ["the"]},
        # Among five tokens, sixteen repeat: the penalty changes which.
        "repetition_penalty": {"allowed_token_ids": [the, 10, 20, 30, 40], "repetition_penalty": 3.0},
        # EOS forced, but not before min_tokens: then it ends the request.
        "min_tokens": {"ignore_eos": False, "min_tokens": 5, "logit_bias": {str(tokenizer.eos_token_id): 100}},
        "stop_token_ids": {"stop_token_ids": every_third},
        "stop_token_ids_included": {"stop_token_ids": every_third, "include_stop_str_in_output": True},
        "stop_string_included": {"stop": ["e", "o"], "include_stop_str_in_output": True},
        "special_tokens_kept": {
            "logit_bias": {str(header): 100},
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
        },
    }
    assert tuple(cases) == FIELD_CASE_NAMES
    return cases


# Requests of n > 1 choices, sampled with a seed: (the prompt's position in prompt_ids, the
# request's fields, which are vLLM's SamplingParams' too). vLLM samples choice i with seed + i.
CHOICE_CASES: dict[str, tuple[int, dict[str, Any]]] = {
    "chat": (0, {"n": 2, "seed": 7, "temperature": 0.9, "max_tokens": MAX_TOKENS, "ignore_eos": True}),
    "completion": (
        len(CHATS),
        {"n": 3, "seed": 11, "temperature": 1.0, "top_p": 0.9, "max_tokens": MAX_TOKENS, "ignore_eos": True},
    ),
}


@pytest.fixture(scope="module")
def reference_choices(tiny_model: Path, prompt_ids, field_cases, tmp_path_factory) -> list[list[ReferenceOutput]]:
    """vLLM's own outputs, all from one engine: each prompt greedily, then each field case on
    the first completion prompt, then each choice case (every choice)."""
    requests = [(ids, greedy(MAX_TOKENS)) for ids in prompt_ids]
    field_prompt = prompt_ids[len(CHATS)]
    requests += [(field_prompt, {**greedy(MAX_TOKENS), **fields}) for fields in field_cases.values()]
    requests += [(prompt_ids[position], fields) for position, fields in CHOICE_CASES.values()]
    return vllm_generate_choices(tiny_model, ENGINE_ARGS, requests, tmp_path_factory.mktemp("agg-reference"))


@pytest.fixture(scope="module")
def reference(prompt_ids, field_cases, reference_choices) -> list[ReferenceOutput]:
    """The greedy prompts' and the field cases' outputs."""
    return [choices[0] for choices in reference_choices[: len(prompt_ids) + len(field_cases)]]


@pytest.fixture(scope="module")
def choice_references(reference_choices) -> dict[str, list[ReferenceOutput]]:
    return dict(zip(CHOICE_CASES, reference_choices[-len(CHOICE_CASES) :], strict=True))


@pytest.fixture(scope="module")
def reference_texts(tokenizer, prompt_ids, reference) -> list[str]:
    """Greedy completions of vLLM itself, decoded as a client would read them."""
    return [tokenizer.decode(output.token_ids, skip_special_tokens=True) for output in reference[: len(prompt_ids)]]


@pytest.fixture(scope="module")
def field_references(prompt_ids, reference) -> dict[str, ReferenceOutput]:
    return dict(zip(FIELD_CASE_NAMES, reference[len(prompt_ids) :], strict=True))


@pytest.fixture(scope="module")
async def vllm_answers(tiny_model, tokenizer, tmp_path_factory) -> dict[str, Answer]:
    """vLLM's own OpenAI server's answer to every conformance case (tests/e2e/conformance.py),
    on this module's engine arguments: here, so the graph below serves the tier as well."""
    assert ENGINE_ARGS["max_model_len"] == MAX_MODEL_LEN  # the cases' context-length errors
    workdir = tmp_path_factory.mktemp("vllm-server")
    return await vllm_server_answers(tiny_model, MODEL, ENGINE_ARGS, CASES, tokenizer, workdir)


@pytest.fixture(scope="module")
async def graph(
    tiny_model, reference_texts, vllm_answers, nats_server, etcd_server, tmp_path_factory
) -> AsyncIterator[ServedGraph]:
    worker = {
        "enable-prefix-caching": True,
        "cpu-omp-threads-bind": ["0", "1"],
        "load-report-interval-s": 0.2,
        "engine-stall-timeout-s": STALL_TIMEOUT_S,
        # vLLM's engine arguments: structured outputs constrain the answer after the reasoning.
        "reasoning-parser": REASONING_PARSER,
        "reasoning-parser-plugin": REASONING_PARSER_PLUGIN,
        "ServiceArgs": {"workers": 2},
    }
    # One Router process: the thin Frontend's Processor service routes through it (the
    # main Frontend then does too; the router inside the Frontend is the mocker tiers' default).
    config = agg_router_config(tiny_model, max_model_len=4096, worker=worker, router_processes=1)
    # tool_choice "auto" and reasoning with the parsers vLLM's server runs (tests/e2e/vllm_server.py).
    config["Processor"].update(
        {
            "enable-auto-tool-choice": True,
            "tool-call-parser": TOOL_CALL_PARSER,
            "reasoning-parser": REASONING_PARSER,
            "reasoning-parser-plugin": REASONING_PARSER_PLUGIN,
        }
    )
    served = ServedGraph(
        "graphs.agg_router:Frontend", config, tmp_path_factory.mktemp("agg"), nats_server.url, etcd_server.url
    )
    with served.running():
        await served.wait_ready(workers=2)
        yield served


@pytest.fixture(scope="module")
def client(graph: ServedGraph) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{graph.base_url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}


@pytest.mark.parametrize("index", range(len(CHATS)))
def test_chat_greedy_equals_vllm_streamed_and_not(client, reference_texts, prompt_ids, index) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=CHATS[index], **GREEDY)
    assert whole.choices[0].message.content == reference_texts[index]
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(prompt_ids[index])
    assert whole.usage.completion_tokens == MAX_TOKENS
    assert whole.usage.total_tokens == len(prompt_ids[index]) + MAX_TOKENS

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=CHATS[index], stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference_texts[index]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids[index]), MAX_TOKENS)


@pytest.mark.parametrize("index", range(len(COMPLETION_PROMPTS)))
def test_completion_greedy_equals_vllm_streamed_and_not(client, reference_texts, prompt_ids, index) -> None:
    position = len(CHATS) + index
    whole = client.completions.create(model=MODEL, prompt=COMPLETION_PROMPTS[index], **GREEDY)
    assert whole.choices[0].text == reference_texts[position]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt_ids[position]), MAX_TOKENS)
    chunks = list(client.completions.create(model=MODEL, prompt=COMPLETION_PROMPTS[index], stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference_texts[position]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
async def test_answers_as_vllms_own_server(graph: ServedGraph, tokenizer, vllm_answers, case: Case) -> None:
    """The conformance tier: Tandem's answer against vLLM's own server's, beyond the
    differences tests/e2e/conformance.py allows (each with its reason)."""
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        answer = await send(http, case, tokenizer)
    assert_conforms(case, vllm_answers[case.name], answer)


def test_models_lists_the_served_model(client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_stop_string_ends_the_text_before_it(client, reference_texts) -> None:
    # A stop string taken from the middle of the greedy text: the answer is what precedes it.
    reference = reference_texts[0]
    stop = reference[len(reference) // 2 :][:3]
    expected = reference[: reference.index(stop)]
    whole = client.chat.completions.create(model=MODEL, messages=CHATS[0], stop=[stop], **GREEDY)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "stop"


def test_the_field_cases_do_what_vllm_says(tokenizer, field_references) -> None:
    """Each case changes vLLM's own output as its fields say: no comparison below is vacuous."""
    (the,) = tokenizer(" the", add_special_tokens=False).input_ids
    assert field_references["logit_bias"].token_ids == [the] * MAX_TOKENS
    assert set(field_references["allowed_token_ids"].token_ids) <= {the, 10, 20, 30, 40}
    assert the not in field_references["bad_words"].token_ids
    assert field_references["repetition_penalty"].token_ids != field_references["allowed_token_ids"].token_ids
    min_tokens = field_references["min_tokens"]
    assert len(min_tokens.token_ids) == 6 and min_tokens.token_ids[-1] == tokenizer.eos_token_id
    assert min_tokens.finish_reason == "stop"
    stopped, included = field_references["stop_token_ids"], field_references["stop_token_ids_included"]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < MAX_TOKENS
    assert included.text.startswith(stopped.text) and len(included.text) > len(stopped.text)
    assert field_references["stop_string_included"].text[-1:] in ("e", "o")
    assert field_references["special_tokens_kept"].text == "<|start_header_id|>" * MAX_TOKENS


def _sse_data(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("case", CHOICE_CASES)
async def test_n_seeded_choices_are_vllms_own(
    graph: ServedGraph, tokenizer, prompt_ids, choice_references, case
) -> None:
    """n choices with a seed: each the tokens vLLM's own LLM samples for that choice."""
    position, fields = CHOICE_CASES[case]
    expected = choice_references[case]
    # Not vacuous: vLLM's choices differ from each other.
    assert len(expected) == fields["n"] and len({tuple(choice.token_ids) for choice in expected}) == fields["n"]
    # vLLM's own text of each choice (a choice that ends inside a UTF-8 character leaves its
    # bytes out, in vLLM's text and in Tandem's).
    texts = [choice.text for choice in expected]
    if case == "chat":
        route, body = "/v1/chat/completions", {"model": MODEL, "messages": CHATS[position], **fields}
    else:
        route, body = "/v1/completions", {"model": MODEL, "prompt": COMPLETION_PROMPTS[position - len(CHATS)], **fields}
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        whole = await http.post(route, json=body)
        assert whole.status_code == 200, whole.text
        streamed = await http.post(route, json={**body, "stream": True, "stream_options": {"include_usage": True}})

    def text(choice: dict[str, Any]) -> str:
        if case == "chat":
            return choice["message"]["content"] if "message" in choice else choice["delta"].get("content", "")
        return choice["text"]

    answer = whole.json()
    assert [(c["index"], text(c), c["finish_reason"]) for c in answer["choices"]] == [
        (index, texts[index], choice.finish_reason) for index, choice in enumerate(expected)
    ]
    assert answer["usage"]["completion_tokens"] == sum(len(choice.token_ids) for choice in expected)
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids[position])
    chunks = _sse_data(streamed.text)
    reassembled = [
        "".join(text(c["choices"][0]) for c in chunks if c["choices"] and c["choices"][0]["index"] == index)
        for index in range(fields["n"])
    ]
    assert reassembled == texts
    assert chunks[-1]["usage"]["completion_tokens"] == answer["usage"]["completion_tokens"]


@pytest.mark.parametrize("case", FIELD_CASE_NAMES)
async def test_vllms_extra_fields_give_vllms_output(graph: ServedGraph, field_cases, field_references, case) -> None:
    expected = field_references[case]
    body = {
        "model": MODEL,
        "prompt": COMPLETION_PROMPTS[0],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        **field_cases[case],
    }
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        whole = await http.post("/v1/completions", json=body)
        assert whole.status_code == 200, whole.text
        streamed = await http.post(
            "/v1/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        )
    choice, usage = whole.json()["choices"][0], whole.json()["usage"]
    assert (choice["text"], choice["finish_reason"]) == (expected.text, expected.finish_reason)
    assert usage["completion_tokens"] == len(expected.token_ids)
    chunks = _sse_data(streamed.text)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected.text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == expected.finish_reason
    # continuous_usage_stats: every chunk counts the tokens so far, the last all of them.
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == len(expected.token_ids)


async def test_disconnect_mid_stream_frees_the_request_in_the_engine(graph: ServedGraph) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"count forever {uuid.uuid4()}"}],
        "max_tokens": 3000,
        "stream": True,
        "ignore_eos": True,
    }
    async with await Runtime.connect(graph.settings) as runtime:
        reports = await runtime.subscribe(names.LOAD_TOPIC, LoadReport)
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("POST", f"{graph.base_url}/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                worker = response.headers["x-tandem-worker"]
                chunks = response.aiter_lines()
                for _ in range(5):
                    await anext(chunks)
                busy = await _next_report(reports, worker, lambda r: r.running >= 1, timeout=30)
                assert busy.running == 1
            disconnected = time.monotonic()
        # 3000 tokens take the engine many seconds; freed at once means the abort got through.
        await _next_report(reports, worker, lambda r: r.running == 0, timeout=5)
        assert time.monotonic() - disconnected < 5
        await reports.close()


async def _next_report(reports, worker: str, predicate, timeout: float) -> LoadReport:
    async with asyncio.timeout(timeout):
        async for report in reports:
            if report.worker_id == worker and predicate(report):
                return report
    raise AssertionError("subscription closed")


def test_shared_prefix_lands_on_the_worker_that_caches_it(graph: ServedGraph) -> None:
    prefix = " ".join(f"shared-context-{i}" for i in range(120))  # several KV blocks
    workers, cached = [], []
    with httpx.Client(base_url=graph.base_url, timeout=120) as http:
        for i in range(4):
            body = {"model": MODEL, "prompt": f"{prefix} question {i}", "max_tokens": 2}
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            workers.append(response.headers["x-tandem-worker"])
            cached.append(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert len(set(workers)) == 1, workers
    # vLLM's own prefix cache: nothing cached for the first, whole blocks for the rest.
    assert cached[0] == 0
    assert all(c >= 4 * BLOCK_SIZE for c in cached[1:]), cached


async def test_round_robin_set_live_spreads_the_same_requests(graph: ServedGraph) -> None:
    async with await Runtime.connect(graph.settings) as runtime:
        await runtime.discovery.put_tunable(ROUTER_POLICY.key, LivePolicy(policy="round-robin"))
        try:
            await asyncio.sleep(0.5)  # the Router's watch applies it
            prefix = " ".join(f"other-context-{i}" for i in range(120))
            workers = set()
            async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
                for i in range(4):
                    body = {"model": MODEL, "prompt": f"{prefix} question {i}", "max_tokens": 2}
                    response = await http.post("/v1/completions", json=body)
                    assert response.status_code == 200, response.text
                    workers.add(response.headers["x-tandem-worker"])
            assert len(workers) == 2
        finally:
            await runtime.discovery.delete_tunable(ROUTER_POLICY.key)


@pytest.mark.parametrize(
    ("route", "body", "status", "mentions"),
    [
        ("/v1/chat/completions", b"{not json", 400, ""),
        ("/v1/chat/completions", {"model": MODEL, "messages": [], "max_tokens": 4}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "no-such-model",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 5000, "max_tokens": 4}, 400, "4096"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 129}, 400, "n"),
        # vLLM's rule, in its words.
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2, "temperature": 0}, 400, "greedy sampling"),
        # vLLM's extra fields: refused where vLLM refuses them (the Frontend's checks) ...
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
        ("/v1/chat/completions", {"model": MODEL, "messages": CHATS[0], "min_p": 2}, 400, "min_p"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "prompt_logprobs": -2}, 400, "prompt_logprobs"),
        # ... and where only the engine knows the vocabulary (vLLM's own checks, in the worker).
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "allowed_token_ids": [5000]}, 400, "allowed_token_ids"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"4000": 5}}, 400, "logit_bias"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": CHATS[0], "stop_token_ids": [3500]},
            400,
            "stop_token_ids",
        ),
    ],
)
def test_bad_requests_get_openai_errors(graph: ServedGraph, route, body, status, mentions) -> None:
    with httpx.Client(base_url=graph.base_url, timeout=60) as http:
        if isinstance(body, bytes):
            response = http.post(route, content=body, headers={"content-type": "application/json"})
        else:
            response = http.post(route, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert mentions in error["message"] or mentions == error.get("param")


HOSTILE_BODIES = [
    b"",
    b"null",
    b"[]",
    b'"a string"',
    b"\xff\xfe\xfd invalid utf-8",
    b'{"model": "tiny-llama", "messages": "\xff\xfe"}',
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 12}]}).encode(),
    json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}).encode(),
    json.dumps({"model": MODEL, "prompt": [[1, 2], [3]], "messages": None}).encode(),
    json.dumps({"model": MODEL, "prompt": [-5, 10**9]}).encode(),
    json.dumps({"model": MODEL, "prompt": "hi", "temperature": 1e308, "top_p": -1}).encode(),
    json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -1}).encode(),
    json.dumps({"model": MODEL, "prompt": "hi", "unknown_field": {"nested": [1, 2]}}).encode(),
    json.dumps({"model": MODEL, "prompt": "x" * (1 << 20)}).encode(),
    json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "y" * (1 << 20)}]}).encode(),
]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_hostile_bodies_never_5xx_and_serving_continues(graph: ServedGraph, route) -> None:
    with httpx.Client(base_url=graph.base_url, timeout=60) as http:
        for body in HOSTILE_BODIES:
            response = http.post(route, content=body, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500, (body[:80], response.status_code, response.text[:300])
            assert "error" in response.json()
        healthy = http.post("/v1/completions", json={"model": MODEL, "prompt": "still there?", "max_tokens": 3})
        assert healthy.status_code == 200, healthy.text


# The fields that reach the engine's deepest checks (grammars compiled by vLLM's structured
# outputs backend, the tool choice's JSON schema, the parsers).
FUZZED_FIELDS = ["response_format", "structured_outputs", "tools", "tool_choice", "parallel_tool_calls", "n", "seed"]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_bodies_from_the_openapi_document_never_5xx_and_serving_continues(graph: ServedGraph, route) -> None:
    """Bodies generated from the graph's own /openapi.json (tests/schema_bodies.py), with the
    constraint fields varied: each served (200) or refused (4xx), never a 5xx, and the
    engine keeps serving after them all."""
    with httpx.Client(base_url=graph.base_url, timeout=120) as http:
        schemas = http.get("/openapi.json").json()["components"]["schemas"]
        name = "ChatCompletionRequest" if "chat" in route else "CompletionRequest"
        prompt = {"messages": CHATS[0]} if "chat" in route else {"prompt": "def fibonacci(n):"}
        statuses: list[int] = []

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(body=SchemaBodies(schemas).of(name, FUZZED_FIELDS))
        def check(body: dict[str, Any]) -> None:
            body = {**body, **prompt, "model": MODEL, "max_tokens": 4}
            response = http.post(route, json=body)
            assert response.status_code < 500, (body, response.status_code, response.text[:300])
            statuses.append(response.status_code)

        check()
        healthy = http.post("/v1/completions", json={"model": MODEL, "prompt": "still there?", "max_tokens": 3})
    assert healthy.status_code == 200, healthy.text
    assert 200 in statuses and any(400 <= status < 500 for status in statuses), statuses  # both kinds reached


@contextlib.asynccontextmanager
async def extra_frontend(
    graph: ServedGraph, *overrides: str, namespace: str | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """Another Frontend process (only that service) for the fleet, or for an empty namespace."""
    port = free_port()
    env = graph.env if namespace is None else {**graph.env, "TANDEM_NAMESPACE": namespace}
    # Its log beside the graph's, for a failing test to be read.
    with (graph.config_path.parent / f"frontend-{port}.log").open("wb") as log:
        process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; stop_process_tree needs a Popen
            [
                TANDEM,
                "serve",
                "graphs.agg_router:Frontend",
                "-f",
                str(graph.config_path),
                "--service-name",
                "Frontend",
                f"--Frontend.port={port}",
                *overrides,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            async with asyncio.timeout(120):
                while True:
                    try:
                        if (await http.get("/live")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.2)
            yield http
    finally:
        stop_process_tree(process)


async def wait_healthy(http: httpx.AsyncClient) -> None:
    async with asyncio.timeout(60):
        while (await http.get("/health")).status_code != 200:
            await asyncio.sleep(0.2)


async def test_a_thin_frontend_calls_the_processor_service_over_nats(graph: ServedGraph, reference_texts) -> None:
    """A second Frontend on the same fleet, with the Processor left to the Processor service."""
    async with extra_frontend(graph, "--Frontend.embed-processor=false") as http:
        await wait_healthy(http)
        body = {"model": MODEL, "messages": CHATS[0], "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == reference_texts[0]


async def _request_while_one_streams(http: httpx.AsyncClient, body: dict) -> tuple[httpx.Response, str | None]:
    """The answer to a request sent while another one streams, and how the streaming one
    ended if it did before its max_tokens (its last event), else None."""
    async with http.stream("POST", "/v1/completions", json=body) as holding:
        assert holding.status_code == 200
        # One iterator for the whole stream: httpx refuses a second pass over a body.
        lines = holding.aiter_lines()
        await anext(lines)
        second = await http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        if second.status_code == 429:
            return second, None
        async with asyncio.timeout(60):
            events = [line async for line in lines if line.startswith("data: {")]
    last = events[-1] if events else "no event"
    return second, None if '"finish_reason":"length"' in last else last


async def test_past_its_inflight_cap_a_frontend_answers_429_with_retry_after(graph: ServedGraph) -> None:
    async with extra_frontend(graph, "--Frontend.max-inflight-requests=1") as http:
        await wait_healthy(http)
        body = {"model": MODEL, "prompt": "one long answer", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        # A held stream that ends early (an error event) frees its slot; that is not the
        # cap failing, so the check is made again (once seen in CI, not reproduced since).
        for _ in range(3):
            refused, ended_early = await _request_while_one_streams(http, body)
            if ended_early is None:
                break
            warnings.warn(f"the held stream ended before its max_tokens: {ended_early}", stacklevel=1)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        # The cap counts requests in flight: once the Frontend sees the stream's client
        # gone (at its next write), the next request is served.
        async with asyncio.timeout(10):
            while (
                served := await http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            ).status_code == 429:
                await asyncio.sleep(0.1)
        assert served.status_code == 200, served.text


async def test_with_no_worker_serving_a_frontend_answers_503_with_retry_after(graph: ServedGraph) -> None:
    async with extra_frontend(graph, namespace=f"empty{uuid.uuid4().hex[:8]}") as http:
        body = {"model": MODEL, "messages": CHATS[0], "max_tokens": 2}
        response = await http.post("/v1/chat/completions", json=body)
        assert (await http.get("/health")).status_code == 503
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"]
    assert response.json()["error"]["message"]


async def test_a_dead_engine_takes_its_worker_out_of_routing_until_supervisord_restarts_it(graph: ServedGraph) -> None:
    """SIGKILL of one worker's vLLM engine core, with requests arriving all along.

    The worker leaves routing within seconds (a dead engine would answer every request
    with an error), exits, and supervisord starts a fresh one with a fresh engine. No
    request sent after the kill fails: the other worker serves them, including any sent
    to the dead one before it left (re-routed before their first token). Last in the
    module: the graph is whole again when it ends.
    """
    async with await Runtime.connect(graph.settings) as runtime:
        workers = await runtime.discovery.watch_instances(names.VLLM_WORKER, names.GENERATE)
        try:
            victim_id, victim = sorted(workers.items.items())[0]
            engine_core = engine_core_of(victim.pid)
            statuses: list[tuple[float, int, str]] = []
            stop_sending = asyncio.Event()

            async def send_requests() -> None:
                async with httpx.AsyncClient(base_url=graph.base_url, timeout=60) as http:
                    i = 0
                    while not stop_sending.is_set():
                        sent = time.monotonic()
                        body = {"model": MODEL, "prompt": f"still serving {i}", "max_tokens": 4}
                        response = await http.post("/v1/completions", json=body)
                        statuses.append((sent, response.status_code, response.text[:200]))
                        i += 1

            senders = [asyncio.create_task(send_requests()) for _ in range(2)]
            try:
                await asyncio.sleep(1.0)
                killed_at = time.monotonic()
                engine_core.kill()
                await workers.wait_until(lambda items: victim_id not in items, timeout=5)
                left_after = time.monotonic() - killed_at
                # supervisord's restart: a new process, a new engine (tens of seconds here).
                await workers.wait_until(lambda items: len(items) == 2, timeout=240)
                serving = dict(workers.items)
                await asyncio.sleep(1.0)
            finally:
                stop_sending.set()
                await asyncio.gather(*senders)
        finally:
            await workers.close()
    assert left_after < 5
    # Two workers again, neither of them the old process.
    assert victim_id not in serving and victim.pid not in {record.pid for record in serving.values()}
    after_kill = [(status, text) for sent, status, text in statuses if sent >= killed_at]
    assert after_kill, "no request was sent after the kill"
    assert all(status == 200 for status, _ in after_kill), [s for s in after_kill if s[0] != 200][:5]
    assert not psutil.pid_exists(victim.pid) or psutil.Process(victim.pid).status() == psutil.STATUS_ZOMBIE


KILLED_STREAMS = 8
KILLED_TOKENS = 600


async def test_a_sigkilled_worker_leaves_no_engine_behind_and_no_stream_fails(graph: ServedGraph) -> None:
    """SIGKILL of the VllmWorker process (not its group) holding most of 8 greedy streams:
    its engine processes are gone within 5 s (the worker's guard, app.launch.leftovers,
    ends them), and each stream ends without an error with the text the same request gets
    unbroken (moved to the other worker: re-routed, or migrated where it was mid-stream).
    After the dead-engine test, last in the module.

    Whether the kill lands mid-stream is not asserted: on this machine the two engines hold
    both cores and what the client has seen says little of how far the engine is
    (docs/reliability.md); the mocker tier (tests/e2e/test_migration_mocker.py) asserts it.
    """
    bodies = [
        {"model": MODEL, "prompt": f"Stream {i} of the kill test:", "max_tokens": KILLED_TOKENS}
        for i in range(KILLED_STREAMS)
    ]
    for body in bodies:
        body.update(temperature=0, ignore_eos=True)
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=300) as http:
        answers = await asyncio.gather(*(http.post("/v1/completions", json=body) for body in bodies))
        unbroken = [answer.json()["choices"][0]["text"] for answer in answers]
        assert len(set(unbroken)) == KILLED_STREAMS
        records = await graph.instances(names.VLLM_WORKER, names.GENERATE)
        before = await migrations(http)
        streams = [Stream() for _ in bodies]
        tasks = [asyncio.create_task(read_stream(http, body, s)) for body, s in zip(bodies, streams, strict=True)]
        await asyncio.wait_for(streams[0].started.wait(), 120)
        while not all(s.worker for s in streams):  # every response's headers are in
            await asyncio.sleep(0.01)
        by_worker: dict[str, int] = {}
        for s in streams:
            by_worker[s.worker] = by_worker.get(s.worker, 0) + 1
        victim = max(by_worker, key=lambda worker: by_worker[worker])
        worker = psutil.Process(records[victim].pid)
        engine = engine_core_of(worker.pid)
        engine_tree = [engine, *engine.children(recursive=True)]
        worker.kill()
        _, outlived = await asyncio.to_thread(psutil.wait_procs, engine_tree, 5)
        await asyncio.wait_for(asyncio.gather(*tasks), 240)
        moved = await migrations(http) - before
    assert outlived == [], f"the killed worker's engine processes outlived it by 5 s: {outlived}"
    assert [s.errors for s in streams] == [[] for _ in streams]
    assert [s.text for s in streams] == unbroken
    assert moved <= by_worker[victim]


# A stream long enough that its engine is still generating it when the test stops the engine.
HUNG_TOKENS = 2000


async def test_a_hung_engine_is_ended_its_worker_leaves_and_an_unmigrated_stream_says_so(graph: ServedGraph) -> None:
    """SIGSTOP of the engine core serving a stream (a hang: it neither dies nor answers):
    the worker sees no engine step for `engine-stall-timeout-s` while it has work, leaves
    routing, ends its engine (a stopped process ends only on SIGKILL) and exits. The stream
    came through a Frontend with `migration-limit: 0`: it ends with an in-stream error
    rather than hang, or move. That the worker left proves the engine held the request when
    it stopped (an engine with nothing to do is never hung), which the client's view, behind
    on this loaded machine, cannot. Last in the module: the worker the test before killed
    may still be starting, and nothing after needs this one.
    """
    body = {"model": MODEL, "prompt": "A hang:", "max_tokens": HUNG_TOKENS, "temperature": 0, "ignore_eos": True}
    async with extra_frontend(graph, "--Processor.migration-limit=0") as unmigrating:
        await wait_healthy(unmigrating)
        records = await graph.instances(names.VLLM_WORKER, names.GENERATE)
        stream = Stream()
        reading = asyncio.create_task(read_stream(unmigrating, body, stream))
        await asyncio.wait_for(stream.started.wait(), 120)
        engine = engine_core_of(records[stream.worker].pid)
        engine_tree = [engine, *engine.children(recursive=True)]
        for process in engine_tree:
            process.suspend()
        stopped_at = time.monotonic()
        try:
            async with asyncio.timeout(STALL_TIMEOUT_S + 15):
                while stream.worker in await graph.instances(names.VLLM_WORKER, names.GENERATE):
                    await asyncio.sleep(0.2)
            left_after = time.monotonic() - stopped_at
            _, outlived = await asyncio.to_thread(psutil.wait_procs, engine_tree, 15)
        finally:
            for process in engine_tree:  # a failed check leaves nothing stopped behind
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.resume()
        await asyncio.wait_for(reading, 60)
    assert STALL_TIMEOUT_S <= left_after < STALL_TIMEOUT_S + 15
    assert outlived == [], f"the hung engine's processes outlived its worker's leaving by 15 s: {outlived}"
    assert [error["type"] for error in stream.errors] == ["service_unavailable_error"], stream.errors
    assert stream.text
