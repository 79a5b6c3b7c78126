"""The mocker enforces structured outputs with vLLM's xgrammar backend: every answer is one
the constraint allows, it ends where the grammar does ("stop"), its tokens stay a function
of the context and the seed, and a constraint that does not compile is vLLM's 400."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from tokenizers import Tokenizer

from app.engines.choices import generate_choices
from app.engines.mocker import MockerEngine
from app.errors import InvalidRequestError
from app.protocol import EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions, StructuredOutputs

_ids = iter(range(1_000_000))
EOS = 2  # the tiny model's <|eot_id|>, which the Processor puts in stop_token_ids
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
}
CHOICES = ["sunny", "rainy", "cloudy"]


def _request(structured: StructuredOutputs | None, seed: int = 0, max_tokens: int = 64, **fields: Any):
    return PreprocessedRequest(
        request_id=f"req-{next(_ids)}",
        model="mocker",
        token_ids=[5, 6, 7, 8],
        sampling=SamplingOptions(structured=structured, seed=seed, **fields),
        stop=StopConditions(max_tokens=max_tokens, stop_token_ids=[EOS]),
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


@pytest.fixture
async def engine(tiny_model: Path):
    mocker = MockerEngine.from_config(
        {"speedup_ratio": 1e6, "model": str(tiny_model), "vocab_size": 3000, "eos_token_id": EOS}
    )
    await mocker.start("w")
    try:
        yield mocker
    finally:
        await mocker.stop()


async def _answer(engine: MockerEngine, request: PreprocessedRequest) -> tuple[list[int], str | None]:
    outputs: list[EngineOutput] = [output async for output in engine.generate(request)]
    return [token for output in outputs for token in output.token_ids], outputs[-1].finish_reason


def _text(tokenizer: Tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _json(text: str) -> Any:
    # xgrammar's JSON strings may hold a raw tab (vLLM's answers too), which strict parsing refuses.
    return json.loads(text, strict=False)


async def test_a_json_schema_answer_validates_and_ends_with_the_grammar(
    engine: MockerEngine, tokenizer: Tokenizer
) -> None:
    structured = StructuredOutputs(json=json.dumps(PERSON), param="response_format")
    for seed in range(5):
        tokens, finish = await _answer(engine, _request(structured, seed))
        assert finish == "stop" and tokens[-1] == EOS, (finish, _text(tokenizer, tokens))
        jsonschema.validate(_json(_text(tokenizer, tokens)), PERSON)
        # The same request, the same answer: a function of the context and the seed.
        assert (await _answer(engine, _request(structured, seed)))[0] == tokens


async def test_choice_regex_and_grammar_answers_are_ones_they_allow(engine: MockerEngine, tokenizer: Tokenizer) -> None:
    answers: dict[str, set[str]] = {"choice": set(), "regex": set(), "grammar": set()}
    for seed in range(6):
        for kind, structured, allows in [
            ("choice", StructuredOutputs(choice=CHOICES), CHOICES.__contains__),
            ("regex", StructuredOutputs(regex="[a-z]{2,6}( [0-9]{1,3}){1,2}"), None),
            (
                "grammar",
                StructuredOutputs(grammar='root ::= "yes" | "no" | "maybe"'),
                ["yes", "no", "maybe"].__contains__,
            ),
        ]:
            tokens, finish = await _answer(engine, _request(structured, seed))
            text = _text(tokenizer, tokens)
            assert finish == "stop", (kind, text)
            assert allows(text) if allows else re.fullmatch("[a-z]{2,6}( [0-9]{1,3}){1,2}", text), (kind, text)
            answers[kind].add(text)
    assert all(len(texts) > 1 for texts in answers.values()), answers  # the seed picks among them


async def test_logit_bias_steers_among_what_the_grammar_allows(engine: MockerEngine, tokenizer: Tokenizer) -> None:
    (no,) = tokenizer.encode("no", add_special_tokens=False).ids
    structured = StructuredOutputs(choice=["yes", "no"])
    for seed in range(3):
        tokens, _ = await _answer(engine, _request(structured, seed, logit_bias={no: 100.0}))
        assert _text(tokenizer, tokens) == "no"
        # A token the grammar does not allow is never forced.
        tokens, _ = await _answer(engine, _request(structured, seed, logit_bias={7: 100.0}))
        assert _text(tokenizer, tokens) in ("yes", "no") and 7 not in tokens


async def test_each_choice_of_n_and_each_request_of_a_batch_has_its_own_matcher(
    engine: MockerEngine, tokenizer: Tokenizer
) -> None:
    structured = StructuredOutputs(json=json.dumps(PERSON))
    request = _request(structured, seed=11)
    request.n = 3
    texts = ["", "", ""]
    finishes: list[str | None] = [None] * 3
    async for output in generate_choices(engine.generate, request):
        texts[output.index] += _text(tokenizer, output.token_ids)
        finishes[output.index] = output.finish_reason or finishes[output.index]
    assert finishes == ["stop"] * 3 and len(set(texts)) > 1, texts
    for text in texts:
        jsonschema.validate(_json(text), PERSON)
    # Many at once, in one batch: each matcher follows its own request's tokens.
    answers = await asyncio.gather(*(_answer(engine, _request(structured, seed)) for seed in range(32)))
    for tokens, finish in answers:
        assert finish == "stop"
        jsonschema.validate(_json(_text(tokenizer, tokens)), PERSON)


async def test_an_answer_cut_by_max_tokens_is_length(engine: MockerEngine) -> None:
    tokens, finish = await _answer(engine, _request(StructuredOutputs(json=json.dumps(PERSON)), max_tokens=3))
    assert (len(tokens), finish) == (3, "length")


@pytest.mark.parametrize(
    ("structured", "says"),
    [
        (StructuredOutputs(regex="(unclosed"), "Failed to transform regex into a grammar"),
        (StructuredOutputs(grammar="root ::= "), "Invalid grammar specification"),
        (StructuredOutputs(json='{"type": "no-such-type"}'), "Failed to transform json schema into a grammar"),
        (StructuredOutputs(json="{not json"), "Invalid JSON grammar specification"),
    ],
)
async def test_a_constraint_that_does_not_compile_is_vllms_400(
    engine: MockerEngine, structured: StructuredOutputs, says: str
) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        await _answer(engine, _request(structured))
    # Refused, not broken: the engine goes on serving.
    assert (await _answer(engine, _request(StructuredOutputs(choice=CHOICES))))[1] == "stop"


async def test_a_schema_feature_xgrammar_lacks_is_a_400_naming_field_and_engine(engine: MockerEngine) -> None:
    # vLLM enforces it with its guidance backend; the mocker would enforce only part of it.
    structured = StructuredOutputs(json='{"type": "integer", "multipleOf": 3}', param="response_format")
    with pytest.raises(InvalidRequestError, match="mocker engine") as error:
        await _answer(engine, _request(structured))
    assert error.value.param == "response_format"


async def test_without_a_tokenizer_a_constraint_is_a_400_naming_field_and_engine() -> None:
    mocker = MockerEngine.from_config({"speedup_ratio": 1e6})
    await mocker.start("w")
    try:
        with pytest.raises(InvalidRequestError, match="mocker engine cannot honour tool_choice") as error:
            await _answer(mocker, _request(StructuredOutputs(json_object=True, param="tool_choice")))
        assert error.value.param == "tool_choice"
        assert len((await _answer(mocker, _request(None, max_tokens=12)))[0]) == 12
    finally:
        await mocker.stop()
