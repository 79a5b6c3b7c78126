"""The mocker honours logit_bias, allowed_token_ids and bad_words as vLLM does, ignores the
fields that shape a distribution it does not have, and refuses what it cannot honour
(structured outputs: test_mocker_grammar.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from app.engines.mocker import MockerEngine
from app.engines.mocker_sampling import TokenChoice, bad_words_token_ids
from app.errors import InvalidRequestError
from app.protocol import EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions

_ids = iter(range(1_000_000))
PROMPT = [5, 6, 7, 8]


def _request(max_tokens: int = 12, stop: dict[str, Any] | None = None, **sampling: Any) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=f"req-{next(_ids)}",
        model="mocker",
        token_ids=PROMPT,
        sampling=SamplingOptions(**sampling),
        stop=StopConditions(max_tokens=max_tokens, **(stop or {})),
    )


async def _tokens(engine: MockerEngine, request: PreprocessedRequest) -> list[int]:
    outputs: list[EngineOutput] = [output async for output in engine.generate(request)]
    return [token for output in outputs for token in output.token_ids]


@pytest.fixture
async def engine(tiny_model: Path):
    # The tiny model's tokenizer (the Processor's) and its vocabulary.
    mocker = MockerEngine.from_config(
        {"speedup_ratio": 1e6, "model": str(tiny_model), "vocab_size": 3000, "eos_token_id": -1}
    )
    await mocker.start("w")
    try:
        yield mocker
    finally:
        await mocker.stop()


async def test_distribution_fields_change_nothing(engine: MockerEngine) -> None:
    plain = await _tokens(engine, _request())
    shaped = await _tokens(
        engine, _request(temperature=0.3, top_p=0.5, top_k=3, min_p=0.2, repetition_penalty=1.5, presence_penalty=1)
    )
    assert shaped == plain and len(plain) == 12


async def test_logit_bias_forces_a_token_past_the_margin_and_bars_one_below_it(engine: MockerEngine) -> None:
    plain = await _tokens(engine, _request())
    assert await _tokens(engine, _request(logit_bias={42: 100.0})) == [42] * 12
    assert await _tokens(engine, _request(logit_bias={42: 5.0})) == plain  # within the own pick's margin
    barred = await _tokens(engine, _request(logit_bias={plain[0]: -100.0}))
    assert barred[0] != plain[0] and plain[0] not in barred


async def test_allowed_token_ids_are_the_only_ones(engine: MockerEngine) -> None:
    allowed = [10, 11, 12]
    tokens = await _tokens(engine, _request(max_tokens=40, allowed_token_ids=allowed))
    assert set(tokens) <= set(allowed) and len(set(tokens)) > 1
    assert await _tokens(engine, _request(allowed_token_ids=allowed, logit_bias={12: 100.0})) == [12] * 12


async def test_bad_words_are_never_completed(engine: MockerEngine, tiny_model: Path) -> None:
    # A one-token word, forced by a bias, then banned as a bad word: the ban wins, as in vLLM.
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    word = next(w for w in ("the", "a", "and", "of") if len(tokenizer.encode(w, add_special_tokens=False).ids) == 1)
    (word_id,) = tokenizer.encode(word, add_special_tokens=False).ids
    assert await _tokens(engine, _request(logit_bias={word_id: 100.0})) == [word_id] * 12
    banned = {ids[-1] for ids in bad_words_token_ids("r", [word], tokenizer)}
    assert word_id in banned
    tokens = await _tokens(engine, _request(logit_bias={word_id: 100.0}, bad_words=[word]))
    assert len(tokens) == 12 and not banned & set(tokens)


def test_a_bad_word_of_several_tokens_bans_its_last_token_after_the_others() -> None:
    choice = TokenChoice(None, {9: 100.0}, [[3, 9]])

    def pick(output: list[int]) -> int:
        return choice.pick(9, [1, 2, *output], 2, lambda rank: rank, 100)

    assert pick([]) == 9 and pick([4]) == 9
    assert pick([4, 3]) != 9


async def test_what_the_mocker_cannot_honour_is_a_400_naming_field_and_engine(engine: MockerEngine) -> None:
    for request, says in [
        (_request(logit_bias={3000: 1.0}), "logit_bias"),
        (_request(allowed_token_ids=[1, 5000]), "allowed_token_ids"),
    ]:
        with pytest.raises(InvalidRequestError, match=says) as error:
            await _tokens(engine, request)
        assert "mocker" in error.value.message
    with pytest.raises(InvalidRequestError, match="bad_words entries must tokenize"):
        await _tokens(engine, _request(bad_words=["   "]))


async def test_without_a_tokenizer_bad_words_are_refused() -> None:
    mocker = MockerEngine.from_config({"speedup_ratio": 1e6})
    await mocker.start("w")
    try:
        with pytest.raises(InvalidRequestError, match="mocker engine cannot honour bad_words"):
            await _tokens(mocker, _request(bad_words=["x"]))
        assert len(await _tokens(mocker, _request())) == 12
    finally:
        await mocker.stop()


async def test_stop_token_ids_min_tokens_and_ignore_eos(engine: MockerEngine) -> None:
    plain = await _tokens(engine, _request(max_tokens=20))
    stop_at = plain[4]
    first = plain.index(stop_at)
    assert await _tokens(engine, _request(max_tokens=20, stop={"stop_token_ids": [stop_at]})) == plain[: first + 1]
    later = await _tokens(engine, _request(max_tokens=20, stop={"stop_token_ids": [stop_at], "min_tokens": first + 2}))
    assert later[: first + 1] == plain[: first + 1] and len(later) > first + 1
