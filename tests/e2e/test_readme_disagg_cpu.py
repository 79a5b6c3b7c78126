"""README.md's disaggregated serving on this CPU machine, run exactly as the README shows it.

The block (`readme-disagg-cpu`) runs in the repository root as a user types it: `make
model`, `tandem infra up` (NATS and etcd on their default ports), `tandem serve
graphs.disagg_router:Frontend -f configs/cpu-tiny-disagg.yaml` (the shipped config, as
shipped: one decode and one prefill vLLM engine, in the config's dtype), `tandem disagg
set`, and its curl of a long prompt. The one thing the
test adds to the environment is TANDEM_STATE_DIR, so that `infra` records (and `infra
down` stops) only the servers this test started, not those of the repository's .state.

One start-up serves every assertion: the prompt was prefilled remotely (the response's
X-Tandem-Prefill-Worker header, and the decode engine's own count of prompt tokens whose
KV it pulled, on the config's VllmWorker metrics-port), the greedy completion equals
vLLM's offline one with the config's engine arguments, and the engine still serves the
next request.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from app.settings import RuntimeSettings
from tests.docs.blocks import REPO, Command, doc_block
from tests.docs.shell import DocShell, HttpResponse, http_response, user_environment
from tests.e2e.vllm_reference import vllm_greedy
from tests.waiting import wait_for_an_instance

pytestmark = pytest.mark.e2e

BLOCK = doc_block("readme-disagg-cpu")
CONFIG = yaml.safe_load((REPO / "configs" / "cpu-tiny-disagg.yaml").read_text())
# `tandem infra up`'s defaults (NATS, its monitoring, etcd clients and peers), the config's
# Frontend and metrics ports: what the block binds on this machine.
FIXED_PORTS = {
    "NATS": 4222,
    "NATS monitoring": 8222,
    "etcd": 2379,
    "etcd peers": 2380,
    "Frontend": CONFIG["Frontend"]["port"],
    **{f"{service} metrics": CONFIG[service]["metrics-port"] for service in ("Router", "VllmWorker", "PrefillWorker")},
}
FRONTEND = f"http://127.0.0.1:{CONFIG['Frontend']['port']}"
DECODE_METRICS = f"http://127.0.0.1:{CONFIG['VllmWorker']['metrics-port']}/metrics"
START_TIMEOUT_S = 600  # two vLLM engines starting on two cores


@dataclass(frozen=True)
class Scenario:
    prompt_tokens: int
    reference: str  # vLLM's own greedy completion of the prompt
    first: HttpResponse
    second: HttpResponse  # the same request again, after the first
    pulled_before: dict[str, float]
    pulled_after: dict[str, float] | None  # None: the decode worker's metrics did not answer


def _ports_in_use() -> list[str]:
    in_use = []
    for what, port in FIXED_PORTS.items():
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                in_use.append(f"{port} ({what})")
    return in_use


def _request_body(shell: DocShell, curl: Command) -> dict:
    """The JSON the curl sends: its here-document, expanded by the shell as curl reads it."""
    return json.loads(shell.check("cat " + curl.text[curl.text.index("<<") :]))


def _decode_pulled_kv() -> dict[str, float] | None:
    """The decode worker's count of prompt tokens whose KV it pulled from a prefill engine, and bytes moved."""
    try:
        with urllib.request.urlopen(DECODE_METRICS, timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return {
        "tokens": samples["tandem_worker_external_kv_prompt_tokens_total"],
        "bytes": samples["tandem_worker_kv_transfer_bytes_total"],
    }


@pytest.fixture(scope="module")
async def scenario(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Scenario]:
    if in_use := _ports_in_use():
        pytest.fail(f"the README's commands bind fixed ports, in use on this machine now: {', '.join(in_use)}")
    make_model, infra_up, serve, disagg_set, export_prompt, curl = BLOCK.expect(
        "make model", "tandem infra up", "tandem serve", "tandem disagg set", "export", "curl"
    )
    workdir = tmp_path_factory.mktemp("readme-disagg-cpu")
    env = user_environment(TANDEM_STATE_DIR=str(workdir / "state"))
    with DocShell(workdir / "shell", env=env) as shell:
        try:
            shell.run(make_model)
            # The reference first: one more engine next to the graph's two would crawl on two cores.
            # The prompt and the request body are the block's own, built by a shell as the block builds them.
            scratch = DocShell(workdir / "scratch", env=env)
            scratch.run(export_prompt)
            body = _request_body(scratch, curl)
            assert body["temperature"] == 0, "the README's request must be greedy to compare it with vLLM's"
            model = REPO / CONFIG["Common"]["model"]
            tokenizer = AutoTokenizer.from_pretrained(model)
            prompt_ids = list(tokenizer(body["prompt"]).input_ids)
            engine_args = {  # the config's, as its workers pass them to vLLM
                "block_size": CONFIG["Common"]["block-size"],
                "max_model_len": CONFIG["Common"]["max-model-len"],
                "dtype": CONFIG["Common"]["dtype"],
                "enforce_eager": CONFIG["VllmWorker"]["enforce-eager"],
            }
            (reference_ids,) = vllm_greedy(
                model, engine_args, [prompt_ids], body["max_tokens"], workdir, ignore_eos=False
            )

            infra_urls = dict(line.split("=", 1) for line in shell.run(infra_up).split())
            shell.start(serve)
            shell.wait_http(f"{FRONTEND}/health", START_TIMEOUT_S)
            # The decode worker queues prompts only while a PrefillWorker is registered: the curl waits for one.
            settings = RuntimeSettings(
                nats_server=infra_urls["NATS_SERVER"], etcd_endpoints=infra_urls["ETCD_ENDPOINTS"]
            )
            await wait_for_an_instance(settings, "PrefillWorker", "status", START_TIMEOUT_S, shell.background_tails)
            shell.run(disagg_set)
            shell.run(export_prompt)
            pulled_before = _decode_pulled_kv()
            assert pulled_before is not None, f"no metrics at {DECODE_METRICS}\n{shell.background_tails()}"
            first = http_response(shell.run(curl))
            pulled_after = _decode_pulled_kv()
            second = http_response(shell.run(curl))
            yield Scenario(
                len(prompt_ids),
                # transformers annotates decode `-> str | list[str]`; of one sequence it is a str.
                tokenizer.decode(reference_ids, skip_special_tokens=True),  # type: ignore[arg-type]
                first,
                second,
                pulled_before,
                pulled_after,
            )
        finally:
            shell.stop_all()
            shell.check(".venv/bin/tandem infra down")


def _text(response: HttpResponse) -> str:
    assert response.status == 200, f"{response.status}: {response.body[:2000]}"
    return json.loads(response.body)["choices"][0]["text"]


def test_the_long_prompt_is_prefilled_by_the_prefill_worker(scenario: Scenario) -> None:
    assert scenario.first.status == 200, scenario.first.body[:2000]
    assert scenario.first.headers.get("x-tandem-prefill-worker"), scenario.first.headers


def test_the_decode_engine_pulled_the_prompts_kv(scenario: Scenario) -> None:
    assert scenario.pulled_after is not None, f"the decode worker's metrics ({DECODE_METRICS}) stopped answering"
    tokens = scenario.pulled_after["tokens"] - scenario.pulled_before["tokens"]
    # vLLM counts every prompt token whose KV came from the connector: all but, at most, a
    # last partial block (which the decode engine computes itself).
    block_size = CONFIG["Common"]["block-size"]
    assert scenario.prompt_tokens - block_size <= tokens <= scenario.prompt_tokens
    assert scenario.pulled_after["bytes"] > scenario.pulled_before["bytes"]


def test_the_greedy_completion_is_vllms_own(scenario: Scenario) -> None:
    assert _text(scenario.first) == scenario.reference


def test_the_engine_serves_the_next_request(scenario: Scenario) -> None:
    assert _text(scenario.second) == scenario.reference
