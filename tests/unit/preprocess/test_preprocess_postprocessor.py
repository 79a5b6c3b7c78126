import random
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import InternalError
from app.openai.schema import ChatCompletionRequest, CompletionRequest, parse_request
from app.preprocess import Preprocessor, StopStringMatcher, postprocess_stream
from app.protocol import EngineOutput, TokenLogprob


def _chat(**fields) -> ChatCompletionRequest:
    return parse_request(
        ChatCompletionRequest, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def _outputs(ids: list[int], finish: str = "stop") -> list[EngineOutput]:
    outputs = [EngineOutput(token_ids=[i]) for i in ids]
    outputs[-1].finish_reason = finish
    return outputs


def _run(preprocessor: Preprocessor, request, outputs: list[EngineOutput]):
    pre = preprocessor.preprocess(request, "r1")
    post = preprocessor.postprocessor(request, pre)
    items = []
    for output in outputs:
        items.append(post.process(output))
        if post.finished:
            break
    return items


def _stop_cases(test: Callable[[str, list[str], list[int]], None]) -> Callable[..., None]:
    """`test(text, stops, cuts)` on many cases: a text, the stop strings to look for in it, and
    where to cut it into the pieces fed."""
    return settings(max_examples=300, deadline=None)(
        given(
            text=st.text(alphabet="ab😀 ", max_size=40),
            stops=st.lists(st.text(alphabet="ab😀 ", min_size=1, max_size=4), min_size=1, max_size=4),
            cuts=st.lists(st.integers(0, 40), max_size=10),
        )(test)
    )


def _fed(matcher: StopStringMatcher, text: str, cuts: list[int]) -> Iterator[tuple[str, str, bool]]:
    """Feeds `text` cut at `cuts`, a piece at a time, until a stop: after each piece, the piece,
    all the text emitted so far and whether it stopped."""
    emitted = ""
    for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(text)], strict=True):
        out, stopped = matcher.feed(text[a:b])
        emitted += out
        yield text[a:b], emitted, stopped
        if stopped:
            return


@_stop_cases
def test_stop_matcher_emits_exactly_the_text_before_the_first_stop(text, stops, cuts) -> None:
    matcher = StopStringMatcher(stops)
    *_, (_, emitted, stopped) = _fed(matcher, text, cuts)
    if not stopped:
        emitted += matcher.flush()
    # Reading one character at a time, the first stop string to complete ends the text.
    first = min(((i + len(s), i) for s in stops if (i := text.find(s)) >= 0), default=(None, None))[1]
    assert stopped == (first is not None)
    assert emitted == (text if first is None else text[:first])


@_stop_cases
def test_stop_matcher_including_the_stop_emits_through_it_and_withholds_nothing(text, stops, cuts) -> None:
    matcher = StopStringMatcher(stops, include_in_output=True)
    for piece, emitted, stopped in _fed(matcher, text, cuts):
        if not stopped:
            assert emitted == text[: len(emitted)] and text[: len(emitted)].endswith(piece)
    if not stopped:
        assert matcher.flush() == ""
    # vLLM's rule: the stop string that completes first ends the text, which keeps it.
    first_end = min((i + len(s) for s in stops if (i := text.find(s)) >= 0), default=None)
    assert stopped == (first_end is not None)
    assert emitted == (text if first_end is None else text[:first_end])


def test_stop_string_split_across_tokens_ends_the_request(preprocessor) -> None:
    text = "The answer is 日本 END of story"
    ids = preprocessor.tokenizer.encode(text, add_special_tokens=False)
    items = _run(preprocessor, _chat(stop=["本 EN"]), _outputs(ids, finish="length"))
    assert "".join(item.text for item in items) == "The answer is 日"
    assert items[-1].finish_reason == "stop"
    assert len(items) < len(ids)  # it stopped before the engine did
    assert all("本" not in item.text for item in items)


def test_stop_strings_wait_for_min_tokens(preprocessor) -> None:
    ids = preprocessor.tokenizer.encode("stop here stop there", add_special_tokens=False)
    items = _run(preprocessor, _chat(stop=["stop"], min_tokens=3), _outputs(ids))
    assert "".join(item.text for item in items) == "stop here "


def test_usage_counts_and_worker_id(preprocessor) -> None:
    ids = preprocessor.tokenizer.encode("hello world", add_special_tokens=False)
    outputs = _outputs(ids, finish="length")
    outputs[0].num_prompt_tokens, outputs[0].num_cached_tokens, outputs[0].worker_id = 18, 16, "w-7"
    items = _run(preprocessor, _chat(), outputs)
    assert items[0].worker_id == "w-7"
    assert items[-1].completion_tokens == len(ids)
    assert items[-1].prompt_tokens == 18 and items[0].cached_tokens == 16
    assert items[-1].finish_reason == "length"


def test_logprobs_are_truncated_to_the_request_and_carry_raw_bytes(preprocessor) -> None:
    ids = preprocessor.tokenizer.encode("🙂", add_special_tokens=False)
    outputs = [
        EngineOutput(
            token_ids=[i],
            logprobs=[-0.5],
            top_logprobs=[[TokenLogprob(i, -0.5), TokenLogprob(5, -1.0), TokenLogprob(6, -2.0)]],
        )
        for i in ids
    ]
    outputs[-1].finish_reason = "stop"
    items = _run(preprocessor, _chat(logprobs=True, top_logprobs=2), outputs)
    entries = [entry for item in items for entry in item.logprobs]
    assert len(entries) == len(ids)
    assert all(len(entry.top) == 2 for entry in entries)
    assert b"".join(bytes(entry.bytes) for entry in entries) == "🙂".encode()
    assert _run(preprocessor, _chat(), outputs)[0].logprobs is None


async def test_stream_closes_the_engine_stream_on_a_stop_string(preprocessor) -> None:
    request = parse_request(CompletionRequest, {"model": "tiny", "prompt": "x", "stop": "o w", "max_tokens": 100})
    pre = preprocessor.preprocess(request, "r2")
    ids = preprocessor.tokenizer.encode("hello world " * 20, add_special_tokens=False)
    state = {"sent": 0, "closed": False}

    async def engine():
        try:
            for token_id in ids:
                state["sent"] += 1
                yield EngineOutput(token_ids=[token_id])
        finally:
            state["closed"] = True

    items = [item async for item in postprocess_stream(preprocessor.postprocessor(request, pre), engine())]
    assert "".join(item.text for item in items) == "hell"
    assert state["closed"] and state["sent"] < len(ids)


async def test_stream_without_finish_reason_is_an_internal_error(preprocessor) -> None:
    request = _chat()
    pre = preprocessor.preprocess(request, "r3")

    async def engine():
        yield EngineOutput(token_ids=[100])

    with pytest.raises(InternalError):
        [item async for item in postprocess_stream(preprocessor.postprocessor(request, pre), engine())]


def test_per_token_cost_does_not_grow_with_length(preprocessor) -> None:
    import time

    rng = random.Random(0)
    ids = [rng.randrange(5, 3000) for _ in range(4000)]

    def cost(n: int) -> float:
        request = _chat(stop=["zzzz", "qqqq"])
        post = preprocessor.postprocessor(request, preprocessor.preprocess(request, "r"))
        started = time.perf_counter()
        for token_id in ids[:n]:
            post.process(EngineOutput(token_ids=[token_id]))
        return (time.perf_counter() - started) / n

    cost(200)  # warm the token caches
    assert cost(4000) < 3 * cost(400)


async def test_stream_of_n_choices_detokenizes_and_stops_each_on_its_own(preprocessor) -> None:
    fields = {"model": "tiny", "prompt": "x", "stop": "o w", "max_tokens": 100, "n": 2, "temperature": 1.0}
    request = parse_request(CompletionRequest, fields)
    pre = preprocessor.preprocess(request, "r4")
    assert pre.n == 2
    # Choice 0 meets the stop string early, choice 1 never does: it runs to its end.
    texts = {0: "hello world " * 20, 1: "a tale of two cities, told twice"}
    ids = {index: preprocessor.tokenizer.encode(text, add_special_tokens=False) for index, text in texts.items()}
    state = {"sent": 0, "closed": False}

    async def engine():
        try:
            for position in range(max(map(len, ids.values()))):
                for index, choice_ids in ids.items():
                    if position < len(choice_ids):
                        state["sent"] += 1
                        last = position == len(choice_ids) - 1
                        yield EngineOutput(
                            token_ids=[choice_ids[position]], index=index, finish_reason="length" if last else None
                        )
        finally:
            state["closed"] = True

    postprocessors = [preprocessor.postprocessor(request, pre) for _ in range(2)]
    items = [item async for item in postprocess_stream(postprocessors, engine())]
    by_choice = {index: [item for item in items if item.index == index] for index in (0, 1)}
    assert "".join(item.text for item in by_choice[0]) == "hell"
    assert "".join(item.text for item in by_choice[1]) == texts[1]
    assert [item.finish_reason for item in items if item.finish_reason] == ["stop", "length"]
    # Nothing of choice 0 after its stop string, though its engine request went on.
    assert by_choice[0][-1].finish_reason == "stop"
    # Each choice counts its own tokens.
    assert [item.completion_tokens for item in by_choice[1]] == list(range(1, len(ids[1]) + 1))
    assert by_choice[0][-1].completion_tokens < len(ids[0])
    # Both finished: the engine stream is closed before choice 0's engine request ended.
    assert state["closed"] and state["sent"] < len(ids[0]) + len(ids[1])


async def test_stream_of_n_choices_ends_only_when_every_choice_has(preprocessor) -> None:
    request = parse_request(CompletionRequest, {"model": "tiny", "prompt": "x", "n": 3, "max_tokens": 5})
    pre = preprocessor.preprocess(request, "r5")

    async def engine():
        yield EngineOutput(token_ids=[100], index=2, finish_reason="length")
        yield EngineOutput(token_ids=[101], index=0, finish_reason="length")

    postprocessors = [preprocessor.postprocessor(request, pre) for _ in range(3)]
    with pytest.raises(InternalError):
        [item async for item in postprocess_stream(postprocessors, engine())]
