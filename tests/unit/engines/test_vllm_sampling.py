"""The wire's sampling fields -> vLLM's SamplingParams: each field to vLLM's field of the same
meaning, and a value vLLM refuses refused with vLLM's words (the worker answers it as a 400)."""

from __future__ import annotations

import pytest
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind

from app.engines.vllm import sampling_params_for
from app.protocol import PreprocessedRequest, SamplingOptions, StopConditions, StructuredOutputs


def _request(sampling: SamplingOptions, stop: StopConditions | None = None) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id="r1",
        model="m",
        token_ids=[1, 2, 3],
        sampling=sampling,
        stop=stop or StopConditions(max_tokens=8),
    )


def test_every_field_reaches_vllm() -> None:
    sampling = SamplingOptions(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.3,
        logprobs=2,
        logit_bias={5: 100.0, 6: -3.0},
        allowed_token_ids=[5, 6, 7],
        bad_words=["foo", "bar"],
    )
    stop = StopConditions(max_tokens=9, stop_token_ids=[4, 2], ignore_eos=True, min_tokens=3)
    params = sampling_params_for(_request(sampling, stop))
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (0.7, 0.9, 40, 0.05, 11)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.5, 1.3)
    assert params.logprobs == 2
    assert params.logit_bias == {5: 100.0, 6: -3.0}
    assert params.allowed_token_ids == [5, 6, 7]
    assert params.bad_words == ["foo", "bar"]
    assert (params.max_tokens, params.min_tokens, params.stop_token_ids, params.ignore_eos) == (9, 3, [4, 2], True)
    # The Processor detokenizes and matches stop strings: none of that in the engine.
    assert params.stop == [] and not params.detokenize and params.output_kind == RequestOutputKind.DELTA


def test_plain_request_leaves_vllms_defaults() -> None:
    params = sampling_params_for(_request(SamplingOptions()))
    assert (params.min_p, params.repetition_penalty, params.logit_bias) == (0.0, 1.0, None)
    assert params.allowed_token_ids is None and params.bad_words == []
    assert params.structured_outputs is None


@pytest.mark.parametrize(
    "structured",
    [
        StructuredOutputs(json='{"type": "object"}', param="response_format", disable_any_whitespace=True),
        StructuredOutputs(regex="[a-z]+"),
        StructuredOutputs(choice=["yes", "no"]),
        StructuredOutputs(grammar='root ::= "a"', whitespace_pattern=" "),
        StructuredOutputs(json_object=True, disable_additional_properties=True),
    ],
)
def test_a_structured_output_constraint_reaches_vllm_field_for_field(structured: StructuredOutputs) -> None:
    given = sampling_params_for(_request(SamplingOptions(structured=structured))).structured_outputs
    assert given is not None
    for field in ("json", "regex", "choice", "grammar", "json_object"):
        assert getattr(given, field) == getattr(structured, field)
    for option in ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"):
        assert getattr(given, option) == getattr(structured, option)


@pytest.mark.parametrize(
    ("sampling", "says"),
    [
        (SamplingOptions(repetition_penalty=0.0), "repetition_penalty must be greater than zero"),
        (SamplingOptions(min_p=2.0), "min_p must be in [0, 1]"),
        (SamplingOptions(bad_words=[""]), "bad_words cannot contain an empty string"),
        (SamplingOptions(top_k=-2), "top_k"),
    ],
)
def test_values_vllm_refuses_are_vllms_client_errors(sampling: SamplingOptions, says: str) -> None:
    # VllmEngine.generate turns VLLMClientError into InvalidRequestError (400) with this message.
    with pytest.raises(VLLMClientError, match=says.replace("[", r"\[")):
        sampling_params_for(_request(sampling))
