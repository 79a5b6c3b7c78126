"""Prometheus /metrics of a service process other than the Frontend (which serves its own).

Each process that sets `metrics-port` in its section serves its registry on that port
plus its replica index (`replica_port`): replicas of one service on a node must not
collide. The views read the service's own state at scrape time, so nothing is kept in
step twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


def replica_port(base_port: int | None, replica: int) -> int | None:
    """Where replica `replica` of a service with `metrics-port: base_port` serves (None: nowhere)."""
    return None if base_port is None else base_port + replica


class _MetricsServer:
    def __init__(self, server: Any) -> None:
        self._server = server

    def shutdown(self) -> None:
        """Stop serving and free the port: prometheus_client's server only stops on its own
        `shutdown`, holding the port, so that a restarted router replica could not bind it."""
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(registry: CollectorRegistry, port: int | None) -> Any:
    """Start the /metrics server (a daemon thread) on `port`; the server to `shutdown()`, or None."""
    if port is None:
        return None
    server, _ = prometheus_client.start_http_server(port, registry=registry)
    return _MetricsServer(server)


class CounterView(Collector):
    """A `collections.Counter` as one labeled Prometheus counter."""

    def __init__(self, name: str, documentation: str, label: str, counts: Counter[str]) -> None:
        self._name, self._documentation, self._label, self._counts = name, documentation, label, counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, count in sorted(self._counts.items()):
            family.add_metric([value], count)
        yield family
