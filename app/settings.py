"""Process settings shared by every Tandem process, from the environment.

Each field is a variable of the registry (app/env.py), which declares its name, default
and doc; this model adds the bounds and the parsing of URL lists.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app import env


def _from_registry(variable: env.Variable[Any], **bounds: Any) -> Any:
    return Field(default=variable.default, validation_alias=variable.name, description=variable.doc, **bounds)


class RuntimeSettings(BaseSettings):
    # populate_by_name: code and tests pass fields by name (`RuntimeSettings(namespace=...)`);
    # an empty variable is unset, as everywhere in the registry.
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_ignore_empty=True)

    nats_server: str = _from_registry(env.NATS_SERVER)
    etcd_endpoints: str = _from_registry(env.ETCD_ENDPOINTS)
    namespace: str = _from_registry(env.TANDEM_NAMESPACE)
    lease_ttl_s: int = _from_registry(env.TANDEM_LEASE_TTL_S, ge=2)
    connect_timeout_s: float = _from_registry(env.TANDEM_CONNECT_TIMEOUT_S, gt=0)
    request_ack_timeout_s: float = _from_registry(env.TANDEM_REQUEST_ACK_TIMEOUT_S, gt=0)
    outage_wait_s: float = _from_registry(env.TANDEM_OUTAGE_WAIT_S, gt=0)

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
                    raw = raw[len(prefix) :]
            if ":" not in raw:
                raw += ":2379"
            out.append(raw.rstrip("/"))
        return out
