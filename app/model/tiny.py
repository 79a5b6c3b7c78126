"""A tiny random-weight Llama with a locally trained tokenizer, made without any download.

Tests and local demos need a model that vLLM serves exactly like a real one (Llama
architecture, safetensors, fast tokenizer, chat template) but that is small, fast on
CPU and reproducible on a machine with no network. Its output is gibberish; what
matters is that the same seed always gives byte-identical files, so greedy output
can be compared across engines, processes and runs.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN)
# A reasoning model's markers, as DeepSeek-R1 has them: added tokens that are not special,
# so they stay in the text vLLM's reasoning parsers split. They come after the trained
# vocabulary with weights of their own, so every other token's id and weights are as they
# would be without them; their lm_head rows are zero, a logit of 0 that is below the
# largest of the random logits at every position. Greedy output never holds them unless a
# request biases them (the reasoning case of tests/e2e/conformance_cases.py).
THINK_TOKENS = ("<think>", "</think>")

VOCAB_SIZE = 3000
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 512
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
MAX_POSITION_EMBEDDINGS = 4096
# Large enough that logits are peaked: with the usual 0.02 the next-token distribution
# is nearly uniform and greedy argmax hinges on rounding noise.
INIT_STD = 0.2

# Llama-3 layout. Content may be a string or a list of OpenAI content parts.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}"
    "{%- set content = message['content'] %}"
    "{%- else %}"
    "{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Multi-byte text so the vocabulary has merges beyond ASCII; the docs alone are English.
_MULTILINGUAL_SAMPLE = (
    "naïve café résumé façade jalapeño Ångström über straße — “quotes” ‘and’ … "
    "日本語のテキスト 中文文本 한국어 텍스트 Ελληνικά кириллица العربية עברית हिन्दी "
    "🙂 🚀 ✓ € £ ¥ ° ± × ÷ ∑ ∞ ≤ ≥ → ← ↑ ↓ "
)


def _training_corpus() -> list[str]:
    """Python's own documentation (ships with every CPython as pydoc_data), in key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)] + [_MULTILINGUAL_SAMPLE] * 3


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of one of SPECIAL_TOKENS (the trainer adds every one of them)."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise RuntimeError(f"the trained tokenizer lacks {token!r}")
    return token_id


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    bos_id = _token_id(tokenizer, BOS_TOKEN)
    # As Llama 3: encoding a plain prompt with special tokens prepends BOS.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in THINK_TOKENS])
    return tokenizer


def _random_weights(vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    # numpy rather than torch: the `tandem` CLI imports this module, and torch takes seconds.
    generator = np.random.default_rng(seed)
    head_dim = HIDDEN_SIZE // NUM_HEADS

    def normal(*shape: int) -> np.ndarray:
        return (generator.standard_normal(shape) * INIT_STD).astype(np.float32)

    def ones(size: int) -> np.ndarray:
        return np.ones(size, dtype=np.float32)

    weights = {"model.embed_tokens.weight": normal(vocab_size, HIDDEN_SIZE)}
    for layer in range(NUM_LAYERS):
        prefix = f"model.layers.{layer}"
        weights[f"{prefix}.self_attn.q_proj.weight"] = normal(NUM_HEADS * head_dim, HIDDEN_SIZE)
        weights[f"{prefix}.self_attn.k_proj.weight"] = normal(NUM_KV_HEADS * head_dim, HIDDEN_SIZE)
        weights[f"{prefix}.self_attn.v_proj.weight"] = normal(NUM_KV_HEADS * head_dim, HIDDEN_SIZE)
        weights[f"{prefix}.self_attn.o_proj.weight"] = normal(HIDDEN_SIZE, NUM_HEADS * head_dim)
        weights[f"{prefix}.mlp.gate_proj.weight"] = normal(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        weights[f"{prefix}.mlp.up_proj.weight"] = normal(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        weights[f"{prefix}.mlp.down_proj.weight"] = normal(HIDDEN_SIZE, INTERMEDIATE_SIZE)
        weights[f"{prefix}.input_layernorm.weight"] = ones(HIDDEN_SIZE)
        weights[f"{prefix}.post_attention_layernorm.weight"] = ones(HIDDEN_SIZE)
    weights["model.norm.weight"] = ones(HIDDEN_SIZE)
    weights["lm_head.weight"] = normal(vocab_size, HIDDEN_SIZE)
    return weights


def _with_think_tokens(weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """THINK_TOKENS' rows after the trained vocabulary's: embeddings from a stream of their
    own (the other weights' draws stay as they were), zero lm_head rows."""
    generator = np.random.default_rng([seed, len(THINK_TOKENS)])
    embeddings = (generator.standard_normal((len(THINK_TOKENS), HIDDEN_SIZE)) * INIT_STD).astype(np.float32)
    zeros = np.zeros((len(THINK_TOKENS), HIDDEN_SIZE), dtype=np.float32)
    return {
        **weights,
        "model.embed_tokens.weight": np.concatenate([weights["model.embed_tokens.weight"], embeddings]),
        "lm_head.weight": np.concatenate([weights["lm_head.weight"], zeros]),
    }


def _model_config(vocab_size: int, bos_id: int, eos_ids: list[int]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HIDDEN_SIZE // NUM_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": INIT_STD,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
        # vLLM's dtype "auto" still downcasts float32 checkpoints to bfloat16; engines whose
        # greedy outputs are compared across batch shapes should pass dtype="float32".
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _tokenizer_config() -> dict[str, Any]:
    added = {}
    for token in SPECIAL_TOKENS:
        added[token] = {
            "content": token,
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOT_TOKEN,
        "pad_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_tiny(out_dir: Path, *, seed: int = 0) -> Path:
    """Write the tiny model into `out_dir` (created if missing) and return it.

    The same seed gives byte-identical files on the same Python and library versions.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size()
    bos_id = _token_id(tokenizer, BOS_TOKEN)
    # Chat turns end with <|eot_id|>, plain text with <|end_of_text|>: both stop generation.
    eos_ids = [_token_id(tokenizer, EOT_TOKEN), _token_id(tokenizer, EOS_TOKEN)]

    weights = out_dir / "model.safetensors"
    trained = _random_weights(vocab_size - len(THINK_TOKENS), seed)
    save_file(_with_think_tokens(trained, seed), str(weights), metadata={"format": "pt"})
    # safetensors writes its file owner-only (0600); the other files follow the umask. The
    # weights must be readable like them: the appliance's containers run as another user
    # (uid 10001, docs/appliance.md) and read the model from a mounted folder.
    weights.chmod((out_dir / "tokenizer.json").stat().st_mode & 0o777)
    _write_json(out_dir / "config.json", _model_config(vocab_size, bos_id, eos_ids))
    _write_json(out_dir / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_ids})
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(
        out_dir / "special_tokens_map.json", {"bos_token": BOS_TOKEN, "eos_token": EOT_TOKEN, "pad_token": EOS_TOKEN}
    )
    logger.info("made tiny model in %s (seed %d, vocab %d)", out_dir, seed, vocab_size)
    return out_dir


def _run_make_tiny(args: argparse.Namespace) -> int:
    make_tiny(Path(args.dir), seed=args.seed)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `model make-tiny DIR [--seed N]` on the top-level `tandem` parser."""
    model_parser = subparsers.add_parser("model", help="local model utilities")
    model_commands = model_parser.add_subparsers(dest="model_command", required=True)
    make = model_commands.add_parser(
        "make-tiny", help="write a tiny random-weight Llama with a local tokenizer (no download)"
    )
    make.add_argument("dir", help="output directory; the directory name becomes the served model name")
    make.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same files)")
    make.set_defaults(func=_run_make_tiny)
