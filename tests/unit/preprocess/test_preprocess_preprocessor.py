import json
import shutil
import time

import msgspec
import pytest

from app.errors import InvalidRequestError
from app.openai.schema import ChatCompletionRequest, CompletionRequest, parse_request
from app.preprocess import Preprocessor

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def _chat(**fields) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, {"model": "tiny", "messages": MESSAGES, **fields})


def _completion(**fields) -> CompletionRequest:
    return parse_request(CompletionRequest, {"model": "tiny", **fields})


def test_chat_uses_the_models_template(preprocessor: Preprocessor) -> None:
    pre = preprocessor.chat(_chat(), "req-1")
    expected = preprocessor.tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert pre.token_ids == preprocessor.tokenizer.encode(expected, add_special_tokens=False)
    assert pre.request_id == "req-1" and pre.model == "tiny"
    assert pre.token_ids.count(preprocessor.tokenizer.bos_token_id) == 1


def test_sampling_parameters_are_mapped(preprocessor: Preprocessor) -> None:
    pre = preprocessor.chat(
        _chat(
            temperature=0.3,
            top_p=0.9,
            top_k=-1,
            seed=7,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logprobs=True,
            top_logprobs=3,
            min_tokens=2,
            max_tokens=50,
            max_completion_tokens=20,
        ),
        "r",
    )
    s = pre.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed) == (0.3, 0.9, 0, 7)
    assert (s.presence_penalty, s.frequency_penalty, s.logprobs) == (0.5, -0.5, 3)
    assert pre.stop.max_tokens == 20  # max_completion_tokens wins over max_tokens
    assert pre.stop.min_tokens == 2
    assert pre.stop.stop_token_ids == preprocessor.eos_token_ids


def test_eos_ids_come_from_generation_config_unless_ignored(preprocessor: Preprocessor) -> None:
    tok = preprocessor.tokenizer
    assert set(preprocessor.eos_token_ids) == {
        tok.convert_tokens_to_ids("<|eot_id|>"),
        tok.convert_tokens_to_ids("<|end_of_text|>"),
    }
    pre = preprocessor.chat(_chat(ignore_eos=True), "r")
    assert pre.stop.ignore_eos and pre.stop.stop_token_ids == []


def test_default_max_tokens_fills_the_context(preprocessor: Preprocessor) -> None:
    pre = preprocessor.chat(_chat(), "r")
    assert pre.stop.max_tokens == preprocessor.max_model_len - len(pre.token_ids)


def test_max_tokens_is_clipped_to_the_room_left_and_more_than_the_context_refused(tiny_model) -> None:
    # vLLM's server: clients ask for a model's whole context and rely on the clip.
    small = Preprocessor(tiny_model, max_model_len=10)
    assert small.completion(_completion(prompt=[5, 6]), "r").stop.max_tokens == 8  # the default 16
    assert small.completion(_completion(prompt=[5, 6], max_tokens=9), "r").stop.max_tokens == 8
    assert small.completion(_completion(prompt=[5, 6], max_tokens=10), "r").stop.max_tokens == 8
    assert small.completion(_completion(prompt=[5, 6], max_tokens=3), "r").stop.max_tokens == 3
    with pytest.raises(InvalidRequestError) as error:
        small.completion(_completion(prompt=[5, 6], max_tokens=11), "r")
    assert error.value.param == "max_tokens" and "10" in error.value.message
    whole = Preprocessor(tiny_model)
    with pytest.raises(InvalidRequestError) as error:
        whole.chat(_chat(max_completion_tokens=whole.max_model_len + 1), "r")
    assert error.value.param == "max_completion_tokens"


def test_too_long_prompts_are_rejected_naming_the_limit(tiny_model) -> None:
    small = Preprocessor(tiny_model, max_model_len=10)
    with pytest.raises(InvalidRequestError) as error:
        small.chat(_chat(), "r")
    assert error.value.status == 400 and error.value.param == "messages"
    assert "maximum context length is 10 tokens" in error.value.message
    with pytest.raises(InvalidRequestError) as error:
        small.chat(_chat(max_completion_tokens=5), "r")
    assert error.value.param == "messages"


def test_a_megabyte_prompt_is_rejected_without_tokenizing_it(preprocessor: Preprocessor) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidRequestError) as error:
        preprocessor.completion(_completion(prompt="word " * 200_000), "r")
    assert error.value.param == "prompt"
    assert time.perf_counter() - started < 0.5


def test_completion_token_ids_are_checked_against_the_vocabulary(preprocessor: Preprocessor) -> None:
    last = preprocessor.vocab_size - 1
    assert preprocessor.completion(_completion(prompt=[1, 2, last]), "r").token_ids == [1, 2, last]
    with pytest.raises(InvalidRequestError) as error:
        preprocessor.completion(_completion(prompt=[1, last + 1]), "r")
    assert error.value.param == "prompt"


def test_completion_text_prompt_gets_bos(preprocessor: Preprocessor) -> None:
    pre = preprocessor.completion(_completion(prompt=["hello"]), "r")
    assert pre.token_ids[0] == preprocessor.tokenizer.bos_token_id
    assert preprocessor.tokenizer.decode(pre.token_ids, skip_special_tokens=True) == "hello"


def test_min_tokens_above_max_tokens_is_rejected(preprocessor: Preprocessor) -> None:
    with pytest.raises(InvalidRequestError) as error:
        preprocessor.chat(_chat(min_tokens=10, max_tokens=5), "r")
    assert error.value.param == "min_tokens"


def test_n_choices_travel_on_the_request(preprocessor: Preprocessor) -> None:
    assert preprocessor.chat(_chat(n=3, temperature=0.7), "r").n == 3
    assert preprocessor.completion(_completion(prompt="hi", n=None), "r").n == 1
    # n=1 is left off the wire.
    assert "n" not in msgspec.msgpack.decode(msgspec.msgpack.encode(preprocessor.chat(_chat(), "r")))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(preprocessor.chat(_chat(n=2), "r")))["n"] == 2


@pytest.mark.parametrize("fields", [{"temperature": 0.0}, {"temperature": 1e-6}])
def test_n_greedy_choices_are_refused_as_vllm_refuses_them(preprocessor: Preprocessor, fields) -> None:
    with pytest.raises(InvalidRequestError) as error:
        preprocessor.chat(_chat(n=2, **fields), "r")
    assert error.value.param == "n" and error.value.message == "n must be 1 when using greedy sampling, got 2."
    assert preprocessor.chat(_chat(n=1, **fields), "r").n == 1


def test_n_greedy_by_the_models_default_temperature_is_refused(tiny_model, tmp_path) -> None:
    model = tmp_path / "greedy-model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    greedy = Preprocessor(model)
    with pytest.raises(InvalidRequestError):
        greedy.chat(_chat(n=2), "r")
    assert greedy.chat(_chat(n=2, temperature=0.5), "r").n == 2
