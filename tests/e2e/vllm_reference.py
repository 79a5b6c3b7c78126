"""Greedy outputs of vLLM itself (its offline `LLM`), the reference Tandem's must equal.

Runs in a subprocess that finishes before the graph under test starts: two engines at
once on two cores would each crawl, and the reference must not share the graph's cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if __name__ == "__main__":
        model, engine_args, prompts, max_tokens, ignore_eos, out = json.loads(sys.argv[1])
        llm = LLM(model=model, **engine_args)
        greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy)
        with open(out, "w") as f:
            json.dump([list(o.outputs[0].token_ids) for o in outputs], f)
    """
)


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
    script, out = workdir / "reference.py", workdir / "outputs.json"
    script.write_text(_SCRIPT)
    argument = json.dumps([str(model), engine_args, prompt_ids, max_tokens, ignore_eos, str(out)])
    result = subprocess.run(
        [sys.executable, str(script), argument], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300
    )
    assert result.returncode == 0, result.stdout.decode(errors="replace")[-4000:]
    return json.loads(out.read_text())
