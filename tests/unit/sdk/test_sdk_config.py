"""The graph config: sections, common-configs, overrides, errors that name service and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.components.frontend import Frontend, FrontendConfig
from app.components.kv_router import Router
from app.components.prefill_worker import PrefillWorker, PrefillWorkerConfig
from app.components.processor import Processor
from app.components.worker import VllmWorker, VllmWorkerConfig
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
    config = load_config(write(tmp_path, "Processor: {model: m, router: kv}\n"))
    with pytest.raises(ConfigError, match="Processor: unknown key 'router'"):
        config.service_config(spec_of(Processor))
    config = load_config(write(tmp_path, "VllmWorker: {model: m, router: kv}\n"))
    with pytest.raises(ConfigError, match="VllmWorker: unknown key 'router'"):
        config.service_config(spec_of(VllmWorker), check_engine_args=True)
    config = load_config(write(tmp_path, "VllmWorker:\n  ServiceArgs: {resources: {gpu: 1, memory: 8Gi}}\n"))
    with pytest.raises(ConfigError, match=r"VllmWorker.ServiceArgs: key 'resources.memory': Extra inputs"):
        config.service_args("VllmWorker")
