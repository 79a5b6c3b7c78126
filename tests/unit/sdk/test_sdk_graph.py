"""Graph resolution: which services `tandem serve ADDRESS` runs."""

from __future__ import annotations

import pytest

from app.sdk.graph import GraphError, dependency_names, graph_service_names, graph_services, resolve


def names(address: str, service_name: str | None = None) -> list[str]:
    module, entry = resolve(address)
    return [spec.name for spec in graph_services(module, entry, service_name)]


def test_each_graph_module_has_its_own_links_even_when_all_are_imported() -> None:
    for module in ("agg", "agg_router", "disagg", "disagg_router"):
        resolve(f"graphs.{module}:Frontend")
    assert names("graphs.agg:Frontend") == ["Frontend", "Processor", "VllmWorker"]
    assert names("graphs.agg_router:Frontend") == ["Frontend", "Processor", "Router", "VllmWorker"]
    assert names("graphs.disagg:Frontend") == ["Frontend", "Processor", "VllmWorker", "PrefillWorker"]
    assert names("graphs.disagg_router:Frontend") == ["Frontend", "Processor", "Router", "VllmWorker", "PrefillWorker"]


def test_a_graph_entered_mid_chain_runs_what_follows_it() -> None:
    assert names("graphs.disagg_router:VllmWorker") == ["VllmWorker", "PrefillWorker"]


def test_a_component_module_runs_the_entry_and_its_depends_transitively() -> None:
    assert names("components.frontend:Frontend") == ["Frontend", "Processor", "Router", "VllmWorker"]
    assert names("components.prefill_worker:PrefillWorker") == ["PrefillWorker"]


def test_service_name_runs_that_service_alone() -> None:
    assert names("components.worker:VllmWorker", "VllmWorker") == ["VllmWorker"]
    assert names("graphs.agg_router:Frontend", "Router") == ["Router"]
    # Not in the graph, but defined in (here: re-exported by) the module.
    assert names("graphs.disagg_router:VllmWorker", "Processor") == ["Processor"]
    with pytest.raises(GraphError, match="--service-name 'Nope'"):
        names("graphs.agg:Frontend", "Nope")


def test_full_dotted_module_names_resolve() -> None:
    assert names("app.graphs.agg:Frontend") == names("graphs.agg:Frontend")


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("graphs.agg", "expected MODULE:Service"),
        ("graphs.nope:Frontend", "no module named 'app.graphs.nope'"),
        ("graphs.agg:Nope", "has no 'Nope'"),
        ("components.worker:VllmWorkerConfig", "is not a service"),
    ],
)
def test_bad_addresses_say_what_is_wrong(address: str, message: str) -> None:
    with pytest.raises(GraphError, match=message):
        resolve(address)


def test_each_process_knows_which_services_its_graph_deploys() -> None:
    """What the Processor picks workers by: graphs.agg deploys no Router, agg_router does."""
    assert graph_service_names("graphs.agg:Frontend") == {"Frontend", "Processor", "VllmWorker"}
    assert "Router" in graph_service_names("graphs.agg_router:Frontend")
    # A component alone: it and what its depends() reach.
    _, processor = resolve("components.processor:Processor")
    assert dependency_names(processor) == graph_service_names("components.processor:Processor")
    assert dependency_names(processor) == {"Processor", "Router", "VllmWorker"}
