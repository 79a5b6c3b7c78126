from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.preprocess import Preprocessor
from app.preprocess.detokenizer import IncrementalDetokenizer

MULTILINGUAL = "naïve café — 日本語のテキスト 中文 한국어 Ελληνικά кириллица 🙂🚀 ∑∞ done"


def _stream(preprocessor: Preprocessor, chunks: list[list[int]], **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(preprocessor.tokenizer.backend_tokenizer, **kwargs)
    return [detok.push(chunk) for chunk in chunks] + [detok.flush()]


def _chunked(ids: list[int], sizes: list[int]) -> list[list[int]]:
    chunks, start = [], 0
    for size in sizes:
        if start >= len(ids):
            break
        chunks.append(ids[start : start + size])
        start += size
    if start < len(ids):
        chunks.append(ids[start:])
    return chunks


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.lists(
        st.one_of(st.integers(0, 2999), st.integers(0, 4), st.integers(5, 300)),  # any, special, byte tokens
        min_size=1,
        max_size=60,
    ),
    sizes=st.lists(st.integers(1, 4), max_size=60),
    skip_special=st.booleans(),
)
def test_random_streams_decode_to_one_decode_of_all(preprocessor, ids, sizes, skip_special) -> None:
    deltas = _stream(preprocessor, _chunked(ids, sizes), skip_special_tokens=skip_special)
    assert "".join(deltas) == preprocessor.tokenizer.decode(ids, skip_special_tokens=skip_special)


def test_multibyte_characters_are_never_split(preprocessor) -> None:
    ids = preprocessor.tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    # The tokenizer really does split characters across tokens, or this test proves nothing.
    assert any("\ufffd" in preprocessor.tokenizer.decode([i]) for i in ids)
    deltas = _stream(preprocessor, [[i] for i in ids])
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == MULTILINGUAL


def test_prompt_context_does_not_leak_into_output(preprocessor) -> None:
    prompt = preprocessor.tokenizer.encode("Once upon a time", add_special_tokens=True)
    ids = preprocessor.tokenizer.encode(" there was 🙂", add_special_tokens=False)
    deltas = _stream(preprocessor, [[i] for i in ids], context_ids=prompt)
    assert "".join(deltas) == " there was 🙂"


def test_special_tokens_are_skipped_by_default(preprocessor) -> None:
    ids = [*preprocessor.tokenizer.encode("hi", add_special_tokens=False), preprocessor.eos_token_ids[0]]
    assert "".join(_stream(preprocessor, [[i] for i in ids])) == "hi"
