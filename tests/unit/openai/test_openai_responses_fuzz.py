"""/v1/responses bodies generated from the Frontend's own /openapi.json (tests/schema_bodies.py),
through everything that reads one before an engine runs it: validation, the translation into
a chat request, the Processor's preprocessing, vLLM's own SamplingParams checks (as a worker
builds them), the first postprocessing step and the Response's rendering. Each body is served
or refused with a 400 that carries a message; no other exception escapes (it would be a 500).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from vllm.exceptions import VLLMClientError

from app.engines.vllm import sampling_params_for
from app.errors import InvalidRequestError
from app.openai import create_app
from app.openai.render import ChoiceParts
from app.openai.responses import ResponseRenderer, chat_request, usage
from app.openai.responses_schema import ResponsesRequest
from app.openai.schema import parse_request
from app.preprocess import Preprocessor
from app.protocol import EngineOutput
from tests.schema_bodies import SchemaBodies
from tests.unit.openai.scripted_backend import MODEL, ScriptedBackend


def _serve_or_refuse(preprocessor: Preprocessor, body: dict[str, Any]) -> None:
    body = {**body, "model": MODEL, "max_output_tokens": 4}
    try:
        request = parse_request(ResponsesRequest, json.dumps(body).encode())
        chat = chat_request(request, MODEL, preprocessor.max_model_len)
        preprocessed = preprocessor.preprocess(chat, "fuzz")
        sampling_params_for(preprocessed)
        item = preprocessor.postprocessor(chat, preprocessed).process(
            EngineOutput(token_ids=[5, 6], finish_reason="length")
        )
    except (InvalidRequestError, VLLMClientError) as refused:
        assert str(refused)  # a 400 that says why
        return
    prompt_tokens = len(preprocessed.token_ids)
    spent = usage(prompt_tokens, 2, 0)
    renderer = ResponseRenderer(request, request_id="fuzz", model=MODEL, created_at=1, max_model_len=4096)
    parts = ChoiceParts()
    parts.add(item.text, item.logprobs, item.tool_calls)
    parts.finish_reason = "length"
    json.dumps(renderer.body(parts, prompt_tokens, spent))
    renderer.start(prompt_tokens) + renderer.events(item) + renderer.finish("length", prompt_tokens, spent)


def test_responses_bodies_from_the_openapi_document(preprocessor: Preprocessor) -> None:
    schemas = SchemaBodies(create_app(ScriptedBackend(preprocessor)).openapi()["components"]["schemas"])

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=schemas.of("ResponsesRequest"))
    def check(body: dict[str, Any]) -> None:
        _serve_or_refuse(preprocessor, body)

    check()
