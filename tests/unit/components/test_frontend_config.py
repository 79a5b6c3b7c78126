"""Where the routing runs: `FrontendConfig.routes_in_process`, from the whole graph config."""

from __future__ import annotations

import pytest

from app.components.frontend import FrontendConfig
from app.protocol import names
from app.sdk.config import ConfigError, GraphConfig, load_config

AGG_ROUTER = {names.FRONTEND, names.PROCESSOR, names.ROUTER, names.VLLM_WORKER}
AGG = {names.FRONTEND, names.PROCESSOR, names.VLLM_WORKER}


def frontend(config: GraphConfig) -> FrontendConfig:
    return config.section_config(names.FRONTEND, FrontendConfig)


@pytest.mark.parametrize(
    ("overrides", "in_process"),
    [
        ([], True),  # the default: no NATS round trip per request
        (["--Router.policy=round-robin"], True),  # a Router section without ServiceArgs
        (["--Router.ServiceArgs.workers=1"], True),  # the default count: the one replica the Frontend is
        (["--Router.ServiceArgs.workers=2"], False),  # replicas asked for
        (["--Router.ServiceArgs.workers=3"], False),
        (["--Router.ServiceArgs.resources={gpu: 0}"], True),  # ServiceArgs without workers names none
        (["--Frontend.embed-router=false"], False),
        (["--Frontend.embed-processor=false"], False),  # the routing is in the Processor service
        (["--Frontend.embed-router=true", "--Router.ServiceArgs.workers=2"], True),  # said explicitly: it wins
    ],
)
def test_the_frontend_routes_in_process_unless_the_config_asks_for_router_processes(
    overrides: list[str], in_process: bool
) -> None:
    config = load_config(None, overrides)
    assert frontend(config).routes_in_process(config, AGG_ROUTER) is in_process
    assert frontend(config).embedded_services(config, AGG_ROUTER) == ({names.ROUTER} if in_process else set())


def test_a_graph_without_a_router_spreads_unless_told_to_route() -> None:
    config = load_config(None)
    assert not frontend(config).routes_in_process(config, AGG)
    told = load_config(None, ["--Frontend.embed-router=true"])
    assert frontend(told).routes_in_process(told, AGG)


def test_embed_router_true_without_the_embedded_processor_is_an_error() -> None:
    config = load_config(None, ["--Frontend.embed-router=true", "--Frontend.embed-processor=false"])
    with pytest.raises(ConfigError, match="embed-router needs embed-processor"):
        frontend(config)


def test_tandem_serve_skips_the_router_only_where_the_frontend_stands_in_for_it() -> None:
    from app.sdk.graph import graph_services, import_components, resolve

    import_components()
    module, entry = resolve("graphs.agg_router:Frontend")
    whole = graph_services(module, entry)
    model = "--Processor.model=m"  # every section of the graph is validated
    assert load_config(None, [model]).embedded_services(whole) == {names.ROUTER}
    assert load_config(None, [model, "--Router.ServiceArgs.workers=2"]).embedded_services(whole) == set()
    # `--service-name Router`: no Frontend in what this serve runs, so the Router runs.
    alone = graph_services(module, entry, names.ROUTER)
    assert load_config(None).embedded_services(alone) == set()
