"""The oracle behind the routing benchmark's "best possible" hit rate."""

from bench.harness.load import RequestResult
from bench.scenarios import best_possible_cached

BLOCK = 4


def sent(at: float, first_token_at: float | None) -> RequestResult:
    ttft = None if first_token_at is None else first_token_at - at
    return RequestResult(ok=first_token_at is not None, e2e_s=1.0, sent_at=at, ttft_s=ttft)


def test_a_prefix_hits_only_once_an_earlier_request_finished_prefilling_it() -> None:
    shared = list(range(100, 112))  # three full blocks
    prompts = [[*shared, 1, 2], [*shared, 3, 4], [*shared, 5, 6], [7] * 14]
    outcomes = [
        sent(0.0, 1.0),  # first of its group: nothing to hit
        sent(0.5, 1.6),  # sent while the first was still prefilling: misses too
        sent(2.0, 2.1),  # after: the three shared blocks
        sent(3.0, 3.1),  # another group
    ]
    assert best_possible_cached(prompts, outcomes, BLOCK) == [0, 0, 12, 0]


def test_an_identical_prompt_never_hits_its_own_last_token() -> None:
    prompt = list(range(8))  # exactly two blocks: the engine recomputes the last token's block
    outcomes = [sent(0.0, 0.5), sent(1.0, 1.5)]
    assert best_possible_cached([prompt, prompt], outcomes, BLOCK) == [0, BLOCK]


def test_a_failed_request_teaches_the_oracle_nothing() -> None:
    prompt = list(range(10))
    outcomes = [sent(0.0, None), sent(1.0, 1.5)]
    assert best_possible_cached([prompt, prompt], outcomes, BLOCK) == [0, 0]
