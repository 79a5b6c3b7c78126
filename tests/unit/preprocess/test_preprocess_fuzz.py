"""Bodies generated from the Frontend's own /openapi.json (tests/schema_bodies.py), through
everything that reads a request before an engine runs it: validation, the Processor's
preprocessing (chat template, tools, structured outputs), vLLM's own SamplingParams checks
(as a worker builds them) and the first postprocessing step. Each body is served or refused
with the 400 errors that carry a message; no other exception escapes (it would be a 500).

The e2e tiers send such bodies to running servers (tests/e2e/test_vllm_conformance.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from vllm.exceptions import VLLMClientError

from app.engines.vllm import sampling_params_for
from app.errors import InvalidRequestError
from app.openai import create_app
from app.openai.schema import ChatCompletionRequest, CompletionRequest, OpenAIRequest, parse_request
from app.preprocess import Preprocessor
from app.protocol import EngineOutput
from tests.schema_bodies import SchemaBodies
from tests.unit.openai.scripted_backend import ScriptedBackend

MODEL = "tiny"


@pytest.fixture(scope="module")
def schemas(preprocessor: Preprocessor) -> SchemaBodies:
    return SchemaBodies(create_app(ScriptedBackend(preprocessor)).openapi()["components"]["schemas"])


# The prompt's own fuzz is tests/unit/openai/test_openai_fuzz.py's: here a valid one, so that
# the generated fields are what is refused or served.
PROMPTS: dict[type[OpenAIRequest], dict[str, Any]] = {
    ChatCompletionRequest: {"messages": [{"role": "user", "content": "hi"}]},
    CompletionRequest: {"prompt": "hi"},
}


def _serve_or_refuse(preprocessor: Preprocessor, request_type: type[OpenAIRequest], body: dict[str, Any]) -> None:
    body = {**body, **PROMPTS[request_type], "model": MODEL, "max_tokens": 4, "stream": False}
    body.pop("max_completion_tokens", None)
    body.pop("stream_options", None)
    try:
        request: OpenAIRequest = parse_request(request_type, json.dumps(body).encode())
        preprocessed = preprocessor.preprocess(request, "fuzz")
        sampling_params_for(preprocessed)
        postprocessor = preprocessor.postprocessor(request, preprocessed)
        postprocessor.process(EngineOutput(token_ids=[5, 6], finish_reason="length"))
    except (InvalidRequestError, VLLMClientError) as refused:
        assert str(refused)  # a 400 that says why


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


# The fields that reach deepest (the chat template, grammars, vLLM's parameter checks).
CONSTRAINTS = ["response_format", "structured_outputs", "tools", "tool_choice", "parallel_tool_calls", "n", "seed"]


@pytest.mark.parametrize(
    ("request_type", "fields"),
    [(ChatCompletionRequest, None), (ChatCompletionRequest, CONSTRAINTS), (CompletionRequest, None)],
    ids=["chat", "chat-constraints", "completion"],
)
def test_bodies_from_the_openapi_document(
    preprocessor: Preprocessor,
    schemas: SchemaBodies,
    request_type: type[OpenAIRequest],
    fields: list[str] | None,
) -> None:
    @_SETTINGS
    @given(body=schemas.of(request_type.__name__, fields))
    def check(body: dict[str, Any]) -> None:
        _serve_or_refuse(preprocessor, request_type, body)

    check()
