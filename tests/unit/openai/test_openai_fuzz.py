"""Hostile and malformed bodies: never a 5xx, always an OpenAI body, and the app keeps serving."""

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.openai import create_app
from tests.unit.openai.scripted_backend import MODEL

FIELDS = [
    "model",
    "messages",
    "prompt",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "user",
    "top_k",
    "min_tokens",
    "ignore_eos",
    "echo",
    "suffix",
    "unknown_field",
]
hostile_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 0.5, 2.0, 1e-300]),
    st.text(max_size=20),
    st.just(MODEL),
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "bot", 3])},
        optional={
            "content": st.one_of(
                st.text(max_size=30),
                st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2),
                hostile_scalars,
            )
        },
    ),
    max_size=3,
)
values = st.recursive(
    hostile_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(values, messages), max_size=8).map(
        lambda d: {"model": MODEL, **d}
    ),
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(values, messages), max_size=8),
    values,
)
raw_bodies = st.one_of(
    bodies.map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=64),
    bodies.map(lambda b: json.dumps(b).encode()[:-1]),
    st.just(b'{"model": "tiny", "prompt": "\xff\xfe invalid utf-8"}'),
    st.just(b'{"model": "tiny", "prompt": "\\udc00"}'),
    st.just(b'{"model": "tiny", "temperature": NaN, "prompt": "x"}'),
    st.just(b'{"model": "tiny", "max_tokens": 1e999, "prompt": "x"}'),
)


# Valid requests with one or two fields made hostile reach the Preprocessor and beyond.
VALID = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 5},
}
near_valid = st.sampled_from(sorted(VALID)).flatmap(
    lambda route: st.tuples(
        st.just(route),
        st.dictionaries(st.sampled_from(FIELDS), st.one_of(values, messages), max_size=2).map(
            lambda changes: json.dumps({**VALID[route], **changes}).encode()
        ),
    )
)
anything = st.tuples(st.sampled_from(sorted(VALID)), raw_bodies)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=st.one_of(anything, near_valid))
async def test_hostile_bodies_never_cause_a_5xx(client, request) -> None:
    route, body = request
    response = await client.post(route, content=body)
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_megabyte_prompts_and_then_normal_service(backend) -> None:
    app = create_app(backend)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        huge = "lorem ipsum " * 90_000
        chat = {"model": MODEL, "messages": [{"role": "user", "content": huge}]}
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 400
        assert (await client.post("/v1/completions", json={"model": MODEL, "prompt": huge})).status_code == 400
        ok = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hello"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
