"""`tandem status` as text (tables an operator reads) or JSON (the shape docs/operations.md fixes)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from app.status.model import FleetStatus, Instance


def render_json(status: FleetStatus, indent: int | None = 2) -> str:
    return json.dumps(status.to_builtins(), indent=indent, sort_keys=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.1f}%"


def _value(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def render_text(status: FleetStatus) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.time))
    hosts = len(status.nodes)
    lines = [
        f"namespace {status.namespace}: {len(status.instances)} processes on {hosts} node{'s' * (hosts != 1)}  ({when})"
    ]
    lines += ["", "NODES"]
    lines += _table(
        ("HOST", "RUNS"),
        [
            (n.host, ", ".join(f"{service} x{count}" for service, count in sorted(n.services.items())))
            for n in status.nodes
        ],
    )
    lines += ["", "INSTANCES"]
    lines += _table(
        ("INSTANCE", "SERVICE", "ROLE", "HOST", "REPLICA", "PID", "UPTIME", "MODEL", "STATE"),
        [
            (
                i.instance_id,
                i.service,
                "+".join(i.roles),
                i.host,
                _dash(i.replica),
                _dash(i.pid),
                _duration(i.uptime_s),
                _dash(i.model),
                "draining" if i.draining else "serving",
            )
            for i in status.instances
        ],
    )
    workers = [i for i in status.instances if i.load is not None]
    if workers:
        lines += ["", "ENGINE LOAD"]
        lines += _table(
            ("INSTANCE", "HOST", "RUNNING", "WAITING", "KV BLOCKS", "KV USAGE", "PREFIX HITS", "AGE"),
            [_load_row(i) for i in workers],
        )
    routers = [i for i in status.instances if i.router is not None]
    if routers:
        lines += ["", "ROUTERS"]
        lines += _table(
            (
                "INSTANCE",
                "SERVICE",
                "POLICY",
                "DECISIONS",
                "HIT RATE",
                "INDEXED",
                "REJECTED BATCHES",
                "KV-BLIND WORKERS",
            ),
            [_router_row(i) for i in routers],
        )
    queue = status.prefill_queue
    if queue is not None:
        lines += ["", f"PREFILL QUEUE {queue.stream}: {queue.depth} jobs not acked ({queue.messages} in the stream)"]
        lines += _table(
            ("CONSUMER", "PENDING", "HELD", "WAITING PULLS", "REDELIVERED"),
            [
                (c.name, str(c.num_pending), str(c.num_ack_pending), str(c.num_waiting), str(c.num_redelivered))
                for c in queue.consumers
            ],
        )
    prefill = [i for i in status.instances if i.prefill is not None]
    if prefill:
        outcomes = sorted({key for i in prefill if i.prefill is not None for key in i.prefill.jobs})
        lines += ["", "PREFILL WORKERS"]
        lines += _table(
            ("INSTANCE", "HOST", "PULLERS", *(o.upper() for o in outcomes)),
            [
                (i.instance_id, i.host, str(i.prefill.pullers), *(str(i.prefill.jobs.get(o, 0)) for o in outcomes))
                for i in prefill
                if i.prefill is not None
            ],
        )
    lines += ["", "TUNABLES"]
    lines += _table(
        ("KEY", "LIVE VALUE", "DEFAULT"),
        [(t.key, "as configured" if t.live is None else _value(t.live), _value(t.default)) for t in status.tunables],
    )
    if status.warnings:
        lines += ["", "WARNINGS"]
        lines += [f"  {warning}" for warning in status.warnings]
    return "\n".join(lines)


def _load_row(instance: Instance) -> tuple[str, ...]:
    load = instance.load
    assert load is not None
    return (
        instance.instance_id,
        instance.host,
        str(load.running),
        str(load.waiting),
        f"{load.kv_used_blocks}/{load.kv_total_blocks}",
        _percent(load.kv_usage),
        _percent(load.prefix_cache_hit_rate),
        f"{load.age_s:.1f}s",
    )


def _router_row(instance: Instance) -> tuple[str, ...]:
    router = instance.router
    assert router is not None
    policy = router.policy + (f" {_value(router.knobs)}" if router.knobs else "")
    blind = sorted({*router.kv_silent_workers, *router.kv_rejected_workers})
    return (
        instance.instance_id,
        instance.service,
        policy,
        str(router.decisions),
        _percent(router.hit_rate),
        str(router.indexed_blocks),
        str(router.rejected_kv_batches),
        ", ".join(blind) or "-",
    )
