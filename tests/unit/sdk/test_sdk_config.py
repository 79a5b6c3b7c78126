"""The graph config: sections, common-configs, overrides, errors that name service and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.components.frontend import Frontend, FrontendConfig
from app.components.kv_router import Router
from app.components.prefill_worker import PrefillWorker, PrefillWorkerConfig
from app.components.processor import Processor
from app.components.worker import VllmWorker, VllmWorkerConfig
from app.router.config import RouterConfig
from app.sdk.config import ConfigError, GraphConfig, load_config
from app.sdk.graph import import_components
from app.sdk.service import spec_of
from app.serving import PipelineConfig

REPO = Path(__file__).resolve().parents[3]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "graph.yaml"
    path.write_text(text)
    return path


def test_common_configs_copies_keys_and_the_section_own_value_wins(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
Common:
  model: m
  block-size: 16
  max-model-len: 4096
Processor:
  common-configs: [model, max-model-len]
  max_model_len: 1024
""",
        )
    )
    processor = config.service_config(spec_of(Processor))
    assert isinstance(processor, PipelineConfig)
    assert (processor.model, processor.max_model_len) == ("m", 1024)


def test_common_configs_naming_a_key_common_lacks_is_an_error(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "Common: {model: m}\nRouter:\n  common-configs: [model, blok-size]\n"))
    with pytest.raises(ConfigError, match="Router: common-configs names 'blok-size'"):
        config.service_config(spec_of(Router))


def test_kebab_and_snake_keys_are_one_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "Frontend:\n  served-model-name: a\n  port: 9000\n"))
    assert config.service_config(spec_of(Frontend)) == FrontendConfig(served_model_name="a", port=9000)
    twice = load_config(write(tmp_path, "Frontend:\n  served-model-name: a\n  served_model_name: b\n"))
    with pytest.raises(ConfigError, match="Frontend: key 'served_model_name' is given twice"):
        twice.service_config(spec_of(Frontend))


def test_unknown_key_error_names_service_and_key_as_written(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "Frontend:\n  prot: 8000\n"))
    with pytest.raises(ConfigError) as raised:
        config.service_config(spec_of(Frontend))
    assert raised.value.errors == ["Frontend: unknown key 'prot'"]


def test_bad_value_error_names_service_and_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "Router:\n  policy: kvv\n"))
    with pytest.raises(ConfigError, match="Router: key 'policy': Value error, unknown router policy 'kvv'"):
        config.service_config(spec_of(Router))


def test_check_reports_unknown_service_and_every_bad_section(tmp_path: Path) -> None:
    import_components()
    config = load_config(
        write(tmp_path, "Frontned: {}\nFrontend: {prot: 1}\nVllmWorker:\n  ServiceArgs: {workers: 0}\n")
    )
    errors = config.check(check_engine_args=False)
    assert errors[0].startswith("unknown service 'Frontned'")
    assert "Frontend: unknown key 'prot'" in errors
    assert any(e.startswith("VllmWorker.ServiceArgs: key 'workers'") for e in errors)


def test_overrides_are_yaml_scalars_and_replace_the_key_however_spelled(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "Frontend:\n  served-model-name: a\nVllmWorker:\n  remote-prefill: false\n"),
        [
            "--Frontend.served_model_name=b",
            "--Frontend.port=9001",
            "--VllmWorker.remote-prefill=true",
            "--VllmWorker.ServiceArgs.workers=3",
            "--VllmWorker.cpu-omp-threads-bind=['0', '1']",
        ],
    )
    assert config.service_config(spec_of(Frontend)) == FrontendConfig(served_model_name="b", port=9001)
    worker = config.service_config(spec_of(VllmWorker))
    assert isinstance(worker, VllmWorkerConfig)
    assert worker.remote_prefill is True
    assert worker.cpu_omp_threads_bind == ["0", "1"]
    assert config.service_args("VllmWorker").workers == 3


@pytest.mark.parametrize("arg", ["--Frontend=1", "--Frontend.port", "--.port=1"])
def test_malformed_override_is_an_error(arg: str) -> None:
    with pytest.raises(ConfigError, match="bad override"):
        GraphConfig(None).apply_override(arg)


def test_worker_keys_it_does_not_define_are_engine_args(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
Common: {model: m, block-size: 16}
PrefillWorker:
  tensor-parallel-size: 8
  cpu-omp-threads-bind: ["0"]
  common-configs: [model, block-size]
""",
        )
    )
    worker = config.service_config(spec_of(PrefillWorker))
    assert isinstance(worker, PrefillWorkerConfig)
    assert worker.cpu_omp_threads_bind == ["0"]
    assert worker.engine_args == {"tensor_parallel_size": 8, "model": "m", "block_size": 16}


def test_unknown_engine_is_an_error(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "VllmWorker: {engine: trt}\n"))
    with pytest.raises(ConfigError, match=r"VllmWorker: key 'engine': .*unknown engine 'trt'"):
        config.service_config(spec_of(VllmWorker))


def test_vllm_engine_args_are_checked_against_vllm(tmp_path: Path) -> None:
    # Imports vLLM (several seconds): once for the whole module.
    good = load_config(write(tmp_path, "VllmWorker: {tensor-parallel-size: 2, enforce-eager: true}\n"))
    checked = good.service_config(spec_of(VllmWorker), check_engine_args=True)
    assert isinstance(checked, VllmWorkerConfig)
    assert checked.engine_args == {
        "tensor_parallel_size": 2,
        "enforce_eager": True,
    }
    bad = load_config(write(tmp_path, "VllmWorker: {tensor-paralel-size: 2}\n"))
    with pytest.raises(ConfigError) as raised:
        bad.service_config(spec_of(VllmWorker), check_engine_args=True)
    assert raised.value.errors == [
        "VllmWorker: unknown key 'tensor-paralel-size' (neither a VllmWorker key nor a vllm engine argument)"
    ]


def test_the_multinode_405b_config_passes_the_full_check() -> None:
    import_components()
    config = load_config(REPO / "configs" / "multinode-405b.yaml")
    assert config.check(check_engine_args=True) == []
    worker = config.service_config(spec_of(VllmWorker))
    assert isinstance(worker, VllmWorkerConfig)
    assert worker.remote_prefill and worker.conditional_disagg
    assert worker.engine_args["kv_transfer_config"] == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    assert config.service_args("PrefillWorker").resources.gpu == 8


def test_keys_that_would_do_nothing_are_refused(tmp_path: Path) -> None:
    # The Processor spreads requests only where no Router runs; `kv` is the Router's policy.
    config = load_config(write(tmp_path, "Processor: {model: m, spread: kv}\n"))
    with pytest.raises(ConfigError, match="Processor: key 'spread': Input should be 'round-robin' or 'random'"):
        config.service_config(spec_of(Processor))
    random = load_config(write(tmp_path, "Processor: {model: m, spread: random}\n"))
    spread = random.service_config(spec_of(Processor))
    assert isinstance(spread, PipelineConfig) and spread.spread == "random"
    config = load_config(write(tmp_path, "VllmWorker:\n  ServiceArgs: {resources: {gpu: 1, memory: 8Gi}}\n"))
    with pytest.raises(ConfigError, match=r"VllmWorker.ServiceArgs: key 'resources.memory': Extra inputs"):
        config.service_args("VllmWorker")


# Dynamo's own side-by-side config: `router: kv` and `block-size` in Common's keys of the
# Processor, the Router and the VllmWorker.
DYNAMO_CONFIG = """
Common: {model: models/tiny-llama, served-model-name: tiny-llama, block-size: 16, max-model-len: 4096}
Frontend: {served-model-name: tiny-llama, port: 18000}
Processor: {common-configs: [model, block-size, max-model-len]}
Router: {router: kv, ServiceArgs: {workers: 1}, common-configs: [model, block-size]}
VllmWorker:
  engine: mocker
  router: kv
  vocab-size: 3000
  eos-token-id: 2
  num-gpu-blocks: 4096
  max-num-seqs: 256
  speedup-ratio: 1000000.0
  ServiceArgs: {workers: 2}
  common-configs: [model, served-model-name, block-size, max-model-len]
"""


def test_a_dynamo_config_with_its_router_and_block_size_keys_passes_the_full_check(tmp_path: Path) -> None:
    import_components()
    config = load_config(write(tmp_path, DYNAMO_CONFIG))
    assert config.check(check_engine_args=True) == []
    router = config.service_config(spec_of(Router))
    assert isinstance(router, RouterConfig) and (router.policy, router.block_size) == ("kv", 16)
    worker = config.service_config(spec_of(VllmWorker), check_engine_args=True)
    assert isinstance(worker, VllmWorkerConfig) and worker.router == "kv"
    assert "router" not in worker.engine_args and worker.engine_args["block_size"] == 16
    processor = config.service_config(spec_of(Processor))
    assert isinstance(processor, PipelineConfig) and processor.block_size == 16


def test_the_routers_router_key_is_its_policy_and_may_not_contradict_it(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "Router: {router: round-robin}\n"))
    router = config.service_config(spec_of(Router))
    assert isinstance(router, RouterConfig) and router.policy == "round-robin"
    same = load_config(write(tmp_path, "Router: {router: random, policy: random}\n")).service_config(spec_of(Router))
    assert isinstance(same, RouterConfig) and same.policy == "random"
    config = load_config(write(tmp_path, "Router: {router: round-robin, policy: kv}\n"))
    with pytest.raises(ConfigError, match=r"Router: .*router 'round-robin' and policy 'kv' disagree"):
        config.service_config(spec_of(Router))
    config = load_config(write(tmp_path, "Router: {router: fastest}\n"))
    with pytest.raises(ConfigError, match=r"Router: key 'router': .*unknown router policy 'fastest'"):
        config.service_config(spec_of(Router))


def test_the_processors_router_key_sets_spread_or_leaves_routing_to_the_router(tmp_path: Path) -> None:
    def processor(section: str) -> PipelineConfig:
        config = load_config(write(tmp_path, f"Processor: {{model: m, {section}}}\n")).service_config(
            spec_of(Processor)
        )
        assert isinstance(config, PipelineConfig)
        return config

    assert processor("router: random").spread == "random"
    assert processor("router: round-robin, spread: round-robin").spread == "round-robin"
    assert processor("router: kv, spread: random").spread == "random"
    assert processor("router: kv").spread == "round-robin"
    with pytest.raises(ConfigError, match=r"Processor: .*router 'random' and spread 'round-robin' disagree"):
        processor("router: random, spread: round-robin")
    with pytest.raises(ConfigError, match="Processor: key 'router': Input should be 'kv', 'round-robin' or 'random'"):
        processor("router: kv-legacy")
    with pytest.raises(ConfigError, match="Processor: key 'block-size': Input should be greater than or equal to 1"):
        processor("block-size: 0")


def test_a_workers_router_key_is_validated_and_never_an_engine_argument(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "PrefillWorker: {engine: mocker, router: round-robin}\n"))
    worker = config.service_config(spec_of(PrefillWorker), check_engine_args=True)
    assert isinstance(worker, PrefillWorkerConfig)
    assert worker.router == "round-robin" and "router" not in worker.engine_args
    config = load_config(write(tmp_path, "VllmWorker: {engine: mocker, router: least-loaded}\n"))
    with pytest.raises(ConfigError, match="VllmWorker: key 'router': Input should be 'kv', 'round-robin' or 'random'"):
        config.service_config(spec_of(VllmWorker), check_engine_args=True)
