"""`tandem status` rendered: the text tables, and the JSON whose shape docs/operations.md fixes."""

from __future__ import annotations

import json
import re
from typing import Any

from app.status.model import FleetStatus, PrefillQueue, QueueConsumer
from app.status.render import render_json, render_text
from tests.docs.blocks import REPO
from tests.unit.status.test_status_model import status


def full_status() -> FleetStatus:
    queue = PrefillQueue(
        stream="ns_prefill_queue",
        depth=5,
        messages=5,
        consumers=[QueueConsumer("workers", num_pending=4, num_ack_pending=1, num_waiting=2, num_redelivered=1)],
    )
    return status(queue=queue, prefill_answers={"w2": {"pullers": 3, "done": 7}})


def section(text: str, title: str) -> list[str]:
    """The lines of one section: from its title to the next blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start + 1 : end]


def row(lines: list[str], first: str) -> list[str]:
    (found,) = [line.split() for line in lines if line.split()[0] == first]
    return found


def test_the_text_has_a_row_per_instance_with_its_role_and_host() -> None:
    text = render_text(full_status())
    assert text.splitlines()[0].startswith("namespace ns: 4 processes on 2 nodes")
    instances = section(text, "INSTANCES")
    assert instances[0].split()[:4] == ["INSTANCE", "SERVICE", "ROLE", "HOST"]
    assert row(instances, "f1")[1:4] == ["Frontend", "frontend+router", "10.0.0.1"]
    assert row(instances, "w2")[-1] == "draining"
    assert row(instances, "w1")[6] == "90s"
    assert section(text, "NODES")[1:] == ["10.0.0.1  Frontend x1, Router x1", "10.0.0.2  VllmWorker x2"]


def test_the_text_shows_load_routers_queue_tunables_and_warnings() -> None:
    text = render_text(full_status())
    assert row(section(text, "ENGINE LOAD"), "w1")[2:7] == ["3", "1", "50/200", "25.0%", "25.0%"]
    assert row(section(text, "ROUTERS"), "r1")[2:5] == ["kv", "10", "75.0%"]
    assert row(section(text, "ROUTERS"), "f1")[-1] == "w2"  # the worker it cannot see
    assert "PREFILL QUEUE ns_prefill_queue: 5 jobs not acked (5 in the stream)" in text
    assert row(section(text, "PREFILL QUEUE"), "workers")[1:] == ["4", "1", "2", "1"]
    assert row(section(text, "PREFILL WORKERS"), "w2")[2:] == ["3", "7"]
    tunables = section(text, "TUNABLES")
    assert row(tunables, "disagg/max_local_prefill_length")[1:] == ["512", "1000"]
    assert " ".join(row(tunables, "disagg/max_prefill_queue_size")[1:]) == "as configured 2"
    assert section(text, "WARNINGS") == ["  router f1: worker w2 serves requests but publishes no KV events"]


def test_sections_without_content_are_left_out() -> None:
    text = render_text(status(loads={}, routers={}))
    assert "ENGINE LOAD" not in text and "ROUTERS" not in text and "PREFILL QUEUE" not in text


def test_the_json_is_the_status_as_builtins_on_one_line_or_indented() -> None:
    fleet = full_status()
    assert json.loads(render_json(fleet)) == json.loads(json.dumps(fleet.to_builtins()))
    assert "\n" not in render_json(fleet, indent=None)


# Values that are maps or values of their own, not objects with fields.
_FREE = {"jobs", "knobs", "services", "live", "default", "kv_resyncs", "kv_resync_failures"}


def _shape(value: Any) -> Any:
    """The field names of a JSON value, recursively (lists by their items' merged shape)."""
    if isinstance(value, dict):
        return {key: None if key in _FREE else _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        merged: dict[str, Any] = {}
        for item in value:
            shape = _shape(item)
            if not isinstance(shape, dict):
                return []
            merged.update({k: v for k, v in shape.items() if v is not None or k not in merged})
        return [merged] if merged else []
    return None


def test_docs_operations_json_example_has_exactly_the_fields_the_command_prints() -> None:
    page = (REPO / "docs/operations.md").read_text()
    example = json.loads(re.search(r"<!-- status-json-example -->\n```json\n(.*?)\n```", page, re.S).group(1))  # type: ignore[union-attr]
    printed = json.loads(render_json(full_status()))
    # Merged over the instances, every nested object shows its fields (each is set on one).
    assert _shape(example["instances"]) == _shape(printed["instances"])
    assert set(example) == set(printed)
    assert _shape(example["prefill_queue"]) == _shape(printed["prefill_queue"])
    assert _shape(example["tunables"]) == _shape(printed["tunables"])
    assert _shape(example["nodes"]) == _shape(printed["nodes"])
    # The field table has a row for every top-level field.
    for field in example:
        assert re.search(rf"^\| `{field}(\[\])?` \|", page, re.M), field
