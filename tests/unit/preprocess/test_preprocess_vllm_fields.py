"""vLLM's extra fields through the text pipeline: onto the wire, into the chat template, and
where Tandem detokenizes (stop tokens, stop strings, special tokens), with vLLM's meaning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import msgspec
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from app.openai.schema import ChatCompletionRequest, CompletionRequest, parse_request
from app.preprocess import Preprocessor
from app.preprocess.detokenizer import IncrementalDetokenizer
from app.protocol import EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions


def _chat(messages: list[dict[str, Any]] | None = None, **fields: Any) -> ChatCompletionRequest:
    body = {"model": "tiny", "messages": messages or [{"role": "user", "content": "hi"}], **fields}
    return parse_request(ChatCompletionRequest, body)


def _completion(**fields: Any) -> CompletionRequest:
    return parse_request(CompletionRequest, {"model": "tiny", "prompt": "hello world", **fields})


def _text(preprocessor: Preprocessor, request: Any, ids: list[int], finish: str = "stop") -> tuple[str, str | None]:
    """The text and finish reason of `ids` streamed one token an output, the last with `finish`."""
    post = preprocessor.postprocessor(request, preprocessor.preprocess(request, "r1"))
    text, reason = "", None
    for index, token_id in enumerate(ids):
        item = post.process(EngineOutput(token_ids=[token_id], finish_reason=finish if index == len(ids) - 1 else None))
        text, reason = text + item.text, item.finish_reason
        if post.finished:
            break
    return text, reason


def test_sampling_fields_go_on_the_wire(preprocessor: Preprocessor) -> None:
    request = _completion(
        logit_bias={"5": 300, "6": -1.5},
        repetition_penalty=1.2,
        min_p=0.1,
        allowed_token_ids=[5, 6, 7],
        bad_words=["foo", "foo", "bar"],
        temperature=0,
        length_penalty=2.0,
        user="u",
    )
    sampling = preprocessor.preprocess(request, "r1").sampling
    assert sampling == SamplingOptions(
        temperature=0.0,
        repetition_penalty=1.2,
        min_p=0.1,
        logit_bias={5: 100.0, 6: -1.5},
        allowed_token_ids=[5, 6, 7],
        bad_words=["foo", "bar"],
    )


def test_a_plain_request_keeps_its_small_wire_form(preprocessor: Preprocessor) -> None:
    pre = preprocessor.preprocess(_completion(temperature=0.5), "r1")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(pre.sampling)) == {"temperature": 0.5}


def test_the_fields_cross_the_wire(preprocessor: Preprocessor) -> None:
    request = _completion(logit_bias={"5": 3}, allowed_token_ids=[5, 6], bad_words=["x"], stop_token_ids=[9], min_p=0.5)
    pre = preprocessor.preprocess(request, "r1")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(pre), type=PreprocessedRequest) == pre


def test_stop_token_ids_join_the_models_eos_unless_it_is_ignored(preprocessor: Preprocessor) -> None:
    eos = preprocessor.eos_token_ids
    assert preprocessor.preprocess(_completion(stop_token_ids=[9, 9, 8]), "r").stop == StopConditions(
        max_tokens=16, stop_token_ids=[9, 8, *eos]
    )
    assert preprocessor.preprocess(_completion(stop_token_ids=[9], ignore_eos=True), "r").stop == StopConditions(
        max_tokens=16, stop_token_ids=[9], ignore_eos=True
    )
    assert preprocessor.preprocess(_completion(), "r").stop.stop_token_ids == eos


def test_generation_config_gives_the_defaults_of_min_p_and_repetition_penalty(tiny_model: Path, tmp_path) -> None:
    model = shutil.copytree(tiny_model, tmp_path / "model")
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.1, "min_p": 0.2}))
    preprocessor = Preprocessor(model)
    defaulted = preprocessor.preprocess(_completion(), "r").sampling
    assert (defaulted.repetition_penalty, defaulted.min_p) == (1.1, 0.2)
    given_ = preprocessor.preprocess(_completion(repetition_penalty=1.0, min_p=0.0), "r").sampling
    assert (given_.repetition_penalty, given_.min_p) == (1.0, 0.0)


def test_chat_template_inputs(preprocessor: Preprocessor) -> None:
    tokenizer = preprocessor.tokenizer
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}]

    def ids(**kwargs: Any) -> list[int]:
        rendered = tokenizer.apply_chat_template(chat, tokenize=False, **kwargs)
        return tokenizer(rendered, add_special_tokens=False).input_ids

    def tandem(**fields: Any) -> list[int]:
        return preprocessor.preprocess(_chat(chat, **fields), "r").token_ids

    assert tandem() == ids(add_generation_prompt=True)
    assert tandem(add_generation_prompt=False) == ids(add_generation_prompt=False)
    continued = tandem(add_generation_prompt=False, continue_final_message=True)
    assert continued == ids(continue_final_message=True)
    assert str(tokenizer.decode(continued)).endswith("Once upon")
    # The template's variables come from chat_template_kwargs, the request's own fields win.
    assert tandem(chat_template_kwargs={"bos_token": "[start]", "add_generation_prompt": False}) == ids(
        add_generation_prompt=True, bos_token="[start]"
    )
    # add_special_tokens: the tokenizer's BOS on top of the template's.
    assert tandem(add_special_tokens=True) == [tokenizer.bos_token_id, *ids(add_generation_prompt=True)]


def test_add_special_tokens_of_a_completion(preprocessor: Preprocessor) -> None:
    bos = preprocessor.tokenizer.bos_token_id
    with_bos = preprocessor.preprocess(_completion(), "r").token_ids
    without = preprocessor.preprocess(_completion(add_special_tokens=False), "r").token_ids
    assert with_bos == [bos, *without]


def test_a_stop_token_is_left_out_of_the_text_unless_included(preprocessor: Preprocessor) -> None:
    """As vLLM: the token the engine stopped at (EOS or stop_token_ids) counts but shows only
    with include_stop_str_in_output, whether or not it is a special token."""
    ids = preprocessor.tokenizer.encode("hello world", add_special_tokens=False)
    before_it = preprocessor.tokenizer.decode(ids[:-1])
    assert _text(preprocessor, _chat(stop_token_ids=[ids[-1]]), ids) == (before_it, "stop")
    assert _text(preprocessor, _chat(include_stop_str_in_output=True), ids) == ("hello world", "stop")
    assert _text(preprocessor, _chat(), ids, finish="length") == ("hello world", "length")
    eot = preprocessor.eos_token_ids[0]
    assert _text(preprocessor, _chat(skip_special_tokens=False), [*ids, eot]) == ("hello world", "stop")
    shown = _text(preprocessor, _chat(skip_special_tokens=False, include_stop_str_in_output=True), [*ids, eot])
    assert shown == ("hello world" + str(preprocessor.tokenizer.decode([eot])), "stop")


def test_special_tokens_show_when_not_skipped(preprocessor: Preprocessor) -> None:
    header = preprocessor.tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    ids = [*preprocessor.tokenizer.encode("hi", add_special_tokens=False), header, header]
    assert _text(preprocessor, _chat(), ids, finish="length")[0] == "hi"
    shown = _text(preprocessor, _chat(skip_special_tokens=False), ids, finish="length")[0]
    assert shown == "hi<|start_header_id|><|start_header_id|>"
    spaced = _chat(skip_special_tokens=False, spaces_between_special_tokens=False)
    assert _text(preprocessor, spaced, ids, finish="length")[0] == shown  # a byte-level decoder adds no spaces


def test_include_stop_str_in_output_keeps_the_stop_string(preprocessor: Preprocessor) -> None:
    ids = preprocessor.tokenizer.encode("The answer is 日本 END of story", add_special_tokens=False)
    request = _chat(stop=["本 EN"], include_stop_str_in_output=True)
    assert _text(preprocessor, request, ids, finish="length") == ("The answer is 日本 EN", "stop")


def _wordpiece() -> Tokenizer:
    """A tokenizer whose decoder puts spaces between tokens, special ones included (BERT's)."""
    tokenizer = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "world": 2, "##s": 3}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens(["[CLS]", "[SEP]"])
    return tokenizer


def test_without_spaces_between_special_tokens_a_special_after_a_special_is_verbatim() -> None:
    tokenizer = _wordpiece()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    assert cls is not None and sep is not None
    ids = [cls, sep, 1, 3, sep, cls, 2]
    expected = {True: "[CLS] [SEP] hellos [SEP] [CLS] world", False: "[CLS][SEP] hellos [SEP][CLS] world"}
    for spaces, text in expected.items():
        one_by_one = IncrementalDetokenizer(tokenizer, skip_special_tokens=False, spaces_between_special_tokens=spaces)
        at_once = IncrementalDetokenizer(tokenizer, skip_special_tokens=False, spaces_between_special_tokens=spaces)
        assert "".join(one_by_one.push([i]) for i in ids) + one_by_one.flush() == text
        assert at_once.push(ids) + at_once.flush() == text
    skipping = IncrementalDetokenizer(tokenizer, skip_special_tokens=True, spaces_between_special_tokens=False)
    assert skipping.push(ids) + skipping.flush() == "hellos world"
