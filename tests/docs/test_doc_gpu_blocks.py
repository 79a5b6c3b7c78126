"""The documents' GPU deployments (Llama 405B on 8-GPU nodes, DeepSeek-R1 over Ray clusters,
the GPU containers), checked as far as a machine without GPUs can: every command runs,
short of starting what needs the GPUs.

- `export ...` runs as written (the next commands see it);
- `tandem serve ...` runs with `--dry-run` appended: the graph, the config file, the
  service name and the overrides must resolve into a plan of processes; and
  `tandem config check -f CONFIG` passes on its config (every key, vLLM's included);
- any other `tandem ...` (`infra up --host 10.0.0.1`, `ray head`, `ray worker`) is parsed
  by tandem's own command line parser: its subcommand and flags must exist;
- `make TARGET ...` runs as `make -n TARGET ...`: the target must exist (make prints
  the docker commands it would run).

Anything else in such a block (a request to a GPU server, a compound line) fails here:
a block that cannot be checked this way is run for real elsewhere or marked `skip`.
Placeholders get the documents' own example addresses.
"""

from __future__ import annotations

import contextlib
import functools
import io
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from app.cli import build_parser
from tests.docs.blocks import REPO, Block, Command, doc_blocks
from tests.docs.shell import DocShell, user_environment

GPU_BLOCKS = doc_blocks(
    "readme-node1-405b",
    "readme-decode-workers-405b",
    "readme-prefill-workers-405b",
    "readme-ray-r1",
    "readme-containers",
    "readme-containers-secure",
    "multinode-head-infra",
    "multinode-join-exports",
    "multinode-advertise-host",
    "multinode-405b-node1",
    "multinode-405b-prefill-nodes",
    "multinode-405b-decode-nodes",
    "multinode-405b-containers",
    "multinode-r1-ray-cluster",
    "multinode-r1-agg-head",
    "multinode-r1-containers",
    "multinode-r1-disagg-ray-clusters",
    "multinode-r1-disagg-decode-head",
    "multinode-r1-disagg-prefill-head",
    "appliance-build",
    "appliance-run",
)
EXAMPLE_ADDRESSES = {
    "head-node-ip": "10.0.0.1",
    "head-ip": "10.0.0.1",
    "ray-head-ip": "10.0.0.1",
    "this-node-ip": "10.0.0.2",
    "node-x-ip": "10.0.0.5",
}
# docs/multinode.md runs its commands "with .venv/bin on PATH" (its introduction says so).
VENV_ON_PATH = {"docs/multinode.md"}


@pytest.mark.parametrize("block", GPU_BLOCKS, ids=[block.name for block in GPU_BLOCKS])
def test_gpu_block_resolves_without_gpus(block: Block, tmp_path: Path) -> None:
    env = user_environment()
    if block.document in VENV_ON_PATH:
        env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env['PATH']}"
    shell = DocShell(tmp_path, env=env, placeholders=EXAMPLE_ADDRESSES)
    for command in block.commands:
        _check_without_gpus(shell, command.substituted(EXAMPLE_ADDRESSES))


def _check_without_gpus(shell: DocShell, command: Command) -> None:
    assert command.is_simple, f"{command}\none program per line in a block checked without GPUs"
    if command.starts_with("export"):
        shell.run(command)
    elif command.starts_with("tandem serve"):
        shell.run(command if "--dry-run" in command.words else command.with_arguments("--dry-run"))
        _config_check(_config_of(command))
    elif command.starts_with("tandem"):
        _parse_as_tandem_does(command)
    elif command.starts_with("make"):
        assert command.text.startswith("make "), command
        shell.run(replace(command, text=f"make -n {command.text.removeprefix('make ')}"))
    else:
        pytest.fail(f"{command}\nhas no check without GPUs: run it in a test of its own, or mark its block skip")


def _config_of(command: Command) -> str:
    words = command.words
    assert "-f" in words, f"{command}\nnames no config file (-f)"
    return words[words.index("-f") + 1]


@functools.cache
def _config_check(config: str) -> None:
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "tandem"), "config", "check", "-f", config],
        cwd=REPO,
        env=user_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"tandem config check -f {config}:\n{result.stderr[-3000:]}"


def _parse_as_tandem_does(command: Command) -> None:
    """Parse the command line with `tandem`'s parser (app.cli), without running it.

    Strictly: only `serve` and `config check` take `--Service.key=value` overrides, and those
    are run, not parsed.
    """
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            build_parser().parse_args(command.program[1:])
    except SystemExit:
        pytest.fail(f"{command}\nis not a valid tandem command line:\n{errors.getvalue()}")
