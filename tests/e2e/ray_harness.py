"""Ray nodes for tests: `tandem ray head|worker`, as an operator runs them, stopped by PID.

On one host (loopback) every node needs ports of its own for what Ray otherwise binds at
fixed defaults, and a temp dir of its own (a short one: Ray's unix sockets live there).
Nothing here calls `ray stop`: it kills every Ray process of the machine by name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from app.engines.vllm_ray import RayDevices
from app.launch.ports import free_port
from testbed.graphs import stop_process_tree
from tests.e2e.graph_configs import MODEL
from tests.e2e.vllm_reference import vllm_greedy

TANDEM = str(Path(sys.executable).with_name("tandem"))

# Every Ray node and vLLM rank on loopback: node addresses, and Gloo's interface (it
# otherwise binds the address the host name resolves to).
LOOPBACK_IP = "127.0.0.1"
LOOPBACK_ENV = {"VLLM_HOST_IP": LOOPBACK_IP, "GLOO_SOCKET_IFNAME": "lo", "RAY_USAGE_STATS_ENABLED": "0"}
# Small and few: the machine is shared. The object store only carries vLLM's control
# messages here; one CPU for Ray's own task workers (vLLM's actors ask for none).
SMALL_NODE_ARGS = ["--num-cpus=1", "--object-store-memory=100000000"]
# Ray refuses --include-dashboard on worker nodes.
HEAD_ONLY_ARGS = ["--include-dashboard=false"]


def short_temp_dir(prefix: str) -> str:
    # Ray's socket paths must stay under the 107-byte unix socket limit.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


# What Ray binds at fixed defaults unless told otherwise: two nodes on one host would clash.
RAY_FIXED_PORT_OPTIONS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)

# What both tensor-parallel tests (test_ray_loopback.py, test_ray_netns.py) ask, and the
# engine arguments of vLLM's own answer at tensor parallel 1. float32: tensor parallel sums
# partial products in another order; in bf16 that can flip a greedy choice, in float32 it does not.
MAX_TOKENS = 16
ENGINE_ARGS = {"block_size": 32, "max_model_len": 2048, "enforce_eager": True, "dtype": "float32"}
CHATS = [
    [{"role": "user", "content": "In the heart of Eldoria, an ancient land of boundless magic, lies Aeloria."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "naïve café — 日本語 🙂 more"}],
]
PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}


def free_ray_port_args() -> list[str]:
    """A free port for each of RAY_FIXED_PORT_OPTIONS, as `ray start` options."""
    return [f"--{name}={free_port()}" for name in RAY_FIXED_PORT_OPTIONS]


def reference_texts_at_tensor_parallel_1(model: Path, workdir: Path) -> list[str]:
    """vLLM's own greedy text, tensor parallel 1, for each of CHATS and then PROMPT."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    rendered = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CHATS]
    prompts = [list(tokenizer(text, add_special_tokens=False).input_ids) for text in rendered]
    prompts.append(list(tokenizer(PROMPT).input_ids))
    outputs = vllm_greedy(model, ENGINE_ARGS, prompts, MAX_TOKENS, workdir)
    # transformers annotates decode `-> str | list[str]`; of one sequence it is a str.
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]  # type: ignore[misc]


class LoopbackRayNode:
    """`tandem ray head` or `tandem ray worker` on this host, on loopback."""

    def __init__(self, role: str, workdir: Path, head_address: str | None = None) -> None:
        self.role = role
        self.temp_dir = short_temp_dir(f"t{role[0]}")
        self.log_path = workdir / f"ray-{role}-{os.getpid()}-{time.monotonic_ns()}.log"
        if role == "head":
            self.gcs_port: int | None = free_port()
            self.address = f"{LOOPBACK_IP}:{self.gcs_port}"
            where = ["--port", str(self.gcs_port)]
        elif head_address is not None:
            self.gcs_port = None
            self.address = head_address
            where = ["--address", head_address]
        else:
            raise ValueError("a Ray worker joins a head: head_address is required")
        extra = [*SMALL_NODE_ARGS, f"--temp-dir={self.temp_dir}", *free_ray_port_args()]
        if role == "head":
            extra += [*HEAD_ONLY_ARGS, f"--ray-client-server-port={free_port()}"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [TANDEM, "ray", role, *where, "--node-ip-address", LOOPBACK_IP, "--", *extra],
                env={**os.environ, **LOOPBACK_ENV},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop_process_tree(self.process, timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


_WAIT_PROBE = """
import logging, sys
from app.engines.vllm_ray import RayClusterTimeoutError, RayDevices, wait_for_ray_devices
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
address, resource, count, timeout, interval = sys.argv[1:]
try:
    wait_for_ray_devices(RayDevices(resource, int(count)), address, float(timeout), float(interval))
except RayClusterTimeoutError as exc:
    print(f"RayClusterTimeoutError: {exc}", file=sys.stderr)
    sys.exit(3)
"""


def wait_in_process(
    address: str, need: RayDevices, timeout: float, log_interval: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The product's wait for devices, in a process of its own as in a worker.

    A process of its own, as in a worker: Ray keeps one connection per process.
    """
    return subprocess.run(
        [sys.executable, "-c", _WAIT_PROBE, address, need.resource, str(need.count), str(timeout), str(log_interval)],
        env={**os.environ, **LOOPBACK_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout + 120,
    )


def wait_for_cluster(address: str, need: RayDevices, timeout: float = 120.0) -> None:
    """Until the cluster at `address` answers and offers `need`."""
    result = wait_in_process(address, need, timeout)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_chat_equals_reference(client: Any, reference_texts: list[str], index: int) -> None:
    """CHATS[index], whole and streamed, must answer what vLLM does at tensor parallel 1."""
    whole = client.chat.completions.create(model=MODEL, messages=CHATS[index], **GREEDY)
    assert whole.choices[0].message.content == reference_texts[index]
    streamed = client.chat.completions.create(model=MODEL, messages=CHATS[index], stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reference_texts[index]


def assert_completion_equals_reference(client: Any, reference_texts: list[str]) -> None:
    """PROMPT must complete to what vLLM makes of it at tensor parallel 1, MAX_TOKENS long."""
    completion = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    assert completion.choices[0].text == reference_texts[-1]
    assert completion.usage.completion_tokens == MAX_TOKENS
