"""Prometheus metrics of the HTTP front door."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.0)


class FrontendMetrics:
    """One registry per app, so several apps (tests, in-process graphs) never collide."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        prefix = "tandem_frontend"
        self.requests = Counter(
            f"{prefix}_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.errors = Counter(
            f"{prefix}_errors", "Errors returned to clients, by kind", ["kind"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            f"{prefix}_time_to_first_token_seconds",
            "Request arrival to first output token",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            f"{prefix}_inter_token_latency_seconds",
            "Time between output tokens of one request",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.input_tokens = Counter(
            f"{prefix}_input_tokens", "Prompt tokens of finished requests", registry=self.registry
        )
        self.output_tokens = Counter(f"{prefix}_output_tokens", "Generated tokens", registry=self.registry)
        self.inflight = Gauge(f"{prefix}_inflight_requests", "Requests being served now", registry=self.registry)
        # Keys are named by their key id (SHA-256 prefix, app/openai/auth.py), never by themselves.
        self.api_key_requests = Counter(
            f"{prefix}_api_key_requests",
            "Generation requests admitted, by API key id",
            ["key"],
            registry=self.registry,
        )
        self.api_key_limited = Counter(
            f"{prefix}_api_key_rate_limited",
            "Generation requests refused with 429 by their API key's own limit, by key id and limit",
            ["key", "limit"],
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
