import argparse
import json
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

from app.model.tiny import THINK_TOKENS, add_cli, make_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_dir)


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_same_seed_gives_identical_files(tiny_dir: Path, tmp_path: Path) -> None:
    again = make_tiny(tmp_path / "again", seed=0)
    assert _files(again) == _files(tiny_dir)


def test_other_seed_changes_weights_but_not_tokenizer(tiny_dir: Path, tmp_path: Path) -> None:
    other = make_tiny(tmp_path / "other", seed=1)
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_config_matches_tokenizer_and_weights(tiny_dir: Path, tokenizer) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == len(tokenizer)
    assert 2500 <= len(tokenizer) <= 3500
    assert config["max_position_embeddings"] >= 4096
    assert (config["hidden_size"], config["num_hidden_layers"]) == (128, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as weights:
        assert weights.get_slice("model.embed_tokens.weight").get_shape() == [len(tokenizer), 128]
        assert weights.get_slice("lm_head.weight").get_shape() == [len(tokenizer), 128]
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in generation["eos_token_id"]


@pytest.mark.parametrize("text", ["naïve café — 日本語 🙂", "Zürich ñandú Ω 🎉🧪 𝔘𝔫𝔦", "plain ascii\n\ttabs  spaces"])
def test_tokenizer_round_trips_utf8(tokenizer, text: str) -> None:
    assert tokenizer.is_fast
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_tokenizer_prepends_bos_and_knows_eos(tokenizer) -> None:
    ids = tokenizer.encode("hello")
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|eot_id|>"


def test_chat_template_renders_llama3_layout(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without.endswith("<|eot_id|>")
    # Special tokens in the rendered prompt must become single ids, not their spelling.
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|eot_id|>")) == 2
    assert ids[0] == tokenizer.bos_token_id


def test_think_tokens_are_text_that_greedy_output_never_holds(tiny_dir: Path, tokenizer) -> None:
    """DeepSeek-R1's markers, for vLLM's reasoning parsers: single tokens after the trained
    vocabulary, kept in decoded text (not special), with a zero logit (their lm_head rows)."""
    ids = tokenizer.convert_tokens_to_ids(list(THINK_TOKENS))
    assert ids == list(range(len(tokenizer) - len(THINK_TOKENS), len(tokenizer)))
    text = "<think>a plan</think>the answer"
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert encoded[0] == ids[0] and ids[1] in encoded
    assert tokenizer.decode(encoded, skip_special_tokens=True) == text
    with safe_open(str(tiny_dir / "model.safetensors"), framework="np") as weights:
        head = weights.get_tensor("lm_head.weight")
        embeddings = weights.get_tensor("model.embed_tokens.weight")
    assert not head[ids].any() and head[: ids[0]].any(axis=1).all()
    assert embeddings[ids].any(axis=1).all()


def test_cli_make_tiny(tiny_dir: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="tandem")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["model", "make-tiny", str(tmp_path / "cli-model"), "--seed", "0"])
    assert args.func(args) == 0
    assert _files(tmp_path / "cli-model") == _files(tiny_dir)


def test_every_file_is_as_readable_as_the_umask_lets_it(tiny_dir: Path) -> None:
    """The appliance's containers read the model as another user (docs/appliance.md)."""
    modes = {path.name: path.stat().st_mode & 0o777 for path in tiny_dir.iterdir()}
    assert len(set(modes.values())) == 1, modes
