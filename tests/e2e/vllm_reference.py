"""Outputs of vLLM itself (its offline `LLM`), the reference Tandem's must equal.

Runs in a subprocess that finishes before the graph under test starts: two engines at
once on two cores would each crawl, and the reference must not share the graph's cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if __name__ == "__main__":
        model, engine_args, requests, out = json.loads(sys.argv[1])
        llm = LLM(model=model, **engine_args)
        # from_optional: what vLLM's server builds from a request's fields (logit_bias keys
        # arrive as JSON's strings there too).
        params = [SamplingParams.from_optional(**fields) for _, fields in requests]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in requests], params)
        # Every choice of each request (SamplingParams.n), in index order.
        choices = [sorted(o.outputs, key=lambda c: c.index) for o in outputs]
        with open(out, "w") as f:
            json.dump([[[list(c.token_ids), c.text, c.finish_reason] for c in cs] for cs in choices], f)
    """
)


class ReferenceOutput(NamedTuple):
    token_ids: list[int]
    text: str  # as vLLM detokenizes it under the request's fields
    finish_reason: str


def vllm_generate(
    model: Path, engine_args: dict[str, Any], requests: list[tuple[list[int], dict[str, Any]]], workdir: Path
) -> list[ReferenceOutput]:
    """vLLM's output for each (prompt token ids, SamplingParams fields), all from one engine
    (the first choice of a request whose fields ask for `n` > 1)."""
    return [choices[0] for choices in vllm_generate_choices(model, engine_args, requests, workdir)]


def vllm_generate_choices(
    model: Path, engine_args: dict[str, Any], requests: list[tuple[list[int], dict[str, Any]]], workdir: Path
) -> list[list[ReferenceOutput]]:
    """vLLM's outputs for each (prompt token ids, SamplingParams fields), all from one engine:
    every one of a request's `n` choices, in index order."""
    script, out = workdir / "reference.py", workdir / "outputs.json"
    script.write_text(_SCRIPT)
    argument = json.dumps([str(model), engine_args, requests, str(out)])
    result = subprocess.run(
        [sys.executable, str(script), argument], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300
    )
    assert result.returncode == 0, result.stdout.decode(errors="replace")[-4000:]
    return [[ReferenceOutput(*choice) for choice in choices] for choices in json.loads(out.read_text())]


def greedy(max_tokens: int, ignore_eos: bool = True) -> dict[str, Any]:
    """The SamplingParams fields of a greedy request."""
    return {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": ignore_eos}


def vllm_greedy(
    model: Path,
    engine_args: dict[str, Any],
    prompt_ids: list[list[int]],
    max_tokens: int,
    workdir: Path,
    ignore_eos: bool = True,
) -> list[list[int]]:
    """Token ids vLLM generates greedily for each prompt (past EOS unless `ignore_eos` is
    False: then as a request without `ignore_eos`, which stops there)."""
    requests = [(ids, greedy(max_tokens, ignore_eos)) for ids in prompt_ids]
    return [output.token_ids for output in vllm_generate(model, engine_args, requests, workdir)]
