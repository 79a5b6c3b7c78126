"""Process settings shared by every Tandem process.

Every field is also an environment variable. `NATS_SERVER` and `ETCD_ENDPOINTS` are
spelled exactly as the multi-node guide spells them, so an operator's shell exports
work unchanged; the rest carry the `TANDEM_` prefix.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    nats_server: str = Field(
        default="nats://127.0.0.1:4222",
        validation_alias=AliasChoices("NATS_SERVER", "TANDEM_NATS_SERVER"),
        description="NATS URL (nats://host:port); comma-separated for a cluster",
    )
    etcd_endpoints: str = Field(
        default="http://127.0.0.1:2379",
        validation_alias=AliasChoices("ETCD_ENDPOINTS", "TANDEM_ETCD_ENDPOINTS"),
        description="etcd client URLs, comma-separated (scheme optional)",
    )
    namespace: str = Field(default="tandem", description="isolates deployments sharing NATS/etcd")
    lease_ttl_s: int = Field(default=10, ge=2, description="etcd lease TTL of each process")
    connect_timeout_s: float = Field(
        default=60.0, gt=0, description="how long to retry NATS/etcd at start before exiting"
    )
    request_ack_timeout_s: float = Field(
        default=5.0, gt=0, description="how long a caller waits for a callee to accept a call"
    )

    @field_validator("nats_server")
    @classmethod
    def _nats_scheme(cls, value: str) -> str:
        urls = [u.strip() for u in value.split(",") if u.strip()]
        for url in urls:
            if not url.startswith(("nats://", "tls://")):
                raise ValueError(f"NATS_SERVER must start with nats:// or tls://, got {url!r}")
        return ",".join(urls)

    def nats_urls(self) -> list[str]:
        return self.nats_server.split(",")

    def etcd_urls(self) -> list[str]:
        """Endpoints as host:port pairs, accepting `http://h:p`, `h:p` or `h`."""
        out = []
        for raw in self.etcd_endpoints.split(","):
            raw = raw.strip()
            if not raw:
                continue
            for prefix in ("http://", "https://"):
                if raw.startswith(prefix):
                    raw = raw[len(prefix):]
            if ":" not in raw:
                raw += ":2379"
            out.append(raw.rstrip("/"))
        return out
