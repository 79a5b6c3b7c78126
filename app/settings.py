"""Process settings shared by every Tandem process, from the environment.

Each field is a variable of the registry (app/env.py), which declares its name, default
and doc; this model adds the bounds and the parsing of URL lists.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app import env


def _from_registry(variable: env.Variable[Any], **bounds: Any) -> Any:
    return Field(default=variable.default, validation_alias=variable.name, description=variable.doc, **bounds)


class RuntimeSettings(BaseSettings):
    # populate_by_name: code and tests pass fields by name (`RuntimeSettings(namespace=...)`);
    # an empty variable is unset, as everywhere in the registry;
    # hide_input_in_errors: a refused NATS_SERVER may carry a password.
    model_config = SettingsConfigDict(
        extra="ignore", populate_by_name=True, env_ignore_empty=True, hide_input_in_errors=True
    )

    nats_server: str = _from_registry(env.NATS_SERVER)
    etcd_endpoints: str = _from_registry(env.ETCD_ENDPOINTS)
    namespace: str = _from_registry(env.TANDEM_NAMESPACE)
    lease_ttl_s: int = _from_registry(env.TANDEM_LEASE_TTL_S, ge=2)
    connect_timeout_s: float = _from_registry(env.TANDEM_CONNECT_TIMEOUT_S, gt=0)
    request_ack_timeout_s: float = _from_registry(env.TANDEM_REQUEST_ACK_TIMEOUT_S, gt=0)
    outage_wait_s: float = _from_registry(env.TANDEM_OUTAGE_WAIT_S, gt=0)
    # Credentials and TLS (docs/security.md); unset: plain, unauthenticated connections.
    nats_password_file: str | None = _from_registry(env.NATS_PASSWORD_FILE)
    nats_token_file: str | None = _from_registry(env.NATS_TOKEN_FILE)
    nats_creds_file: str | None = _from_registry(env.NATS_CREDS_FILE)
    nats_tls_ca: str | None = _from_registry(env.NATS_TLS_CA)
    nats_tls_cert: str | None = _from_registry(env.NATS_TLS_CERT)
    nats_tls_key: str | None = _from_registry(env.NATS_TLS_KEY)
    etcd_user: str | None = _from_registry(env.ETCD_USER)
    etcd_password_file: str | None = _from_registry(env.ETCD_PASSWORD_FILE)
    etcd_tls_ca: str | None = _from_registry(env.ETCD_TLS_CA)
    etcd_tls_cert: str | None = _from_registry(env.ETCD_TLS_CERT)
    etcd_tls_key: str | None = _from_registry(env.ETCD_TLS_KEY)

    @field_validator("nats_server")
    @classmethod
    def _nats_scheme(cls, value: str) -> str:
        urls = [u.strip() for u in value.split(",") if u.strip()]
        for url in urls:
            if not url.startswith(("nats://", "tls://")):
                raise ValueError(f"NATS_SERVER must start with nats:// or tls://, got {redact_url(url)!r}")
        return ",".join(urls)

    @model_validator(mode="after")
    def _credentials_complete(self) -> RuntimeSettings:
        if self.nats_password_file and not all(urlsplit(url).username for url in self.nats_urls()):
            raise ValueError("NATS_PASSWORD_FILE is set: name its user in NATS_SERVER (tls://USER@HOST:PORT)")
        for cert, key, names in (
            (self.nats_tls_cert, self.nats_tls_key, "NATS_TLS_CERT and NATS_TLS_KEY"),
            (self.etcd_tls_cert, self.etcd_tls_key, "ETCD_TLS_CERT and ETCD_TLS_KEY"),
        ):
            if bool(cert) != bool(key):
                raise ValueError(f"{names} go together: set both or neither")
        if bool(self.etcd_user) != bool(self.etcd_password_file):
            raise ValueError("ETCD_USER and ETCD_PASSWORD_FILE go together: set both or neither")
        if len({raw.strip().startswith("https://") for raw in self.etcd_endpoints.split(",") if raw.strip()}) > 1:
            raise ValueError("ETCD_ENDPOINTS mixes https:// with plain endpoints")
        if self.nats_tls_ca and not all(url.startswith("tls://") for url in self.nats_urls()):
            raise ValueError("NATS_TLS_CA is set: NATS_SERVER must use tls://")
        if self.etcd_tls_ca and not self.etcd_tls():
            raise ValueError("ETCD_TLS_CA is set: ETCD_ENDPOINTS must use https://")
        if self.etcd_tls() and not self.etcd_tls_ca:
            raise ValueError("ETCD_ENDPOINTS uses https://: set ETCD_TLS_CA to the CA that signed etcd's certificate")
        return self

    def nats_urls(self) -> list[str]:
        return self.nats_server.split(",")

    def nats_server_redacted(self) -> str:
        """NATS_SERVER as logs and errors show it: any password in it replaced by `***`."""
        return ",".join(redact_url(url) for url in self.nats_urls())

    def etcd_tls(self) -> bool:
        """Whether etcd is dialled with TLS: its endpoints are https:// (the validator refuses a mix)."""
        return self.etcd_endpoints.strip().startswith("https://")

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


# `[scheme://]user:password@`: what of a URL is hidden wherever it is shown.
_URL_PASSWORD = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*://)?[^:/@]*):[^@/]*@")


def redact_url(url: str) -> str:
    """`scheme://user:***@host:port`: the URL with its password (if any) hidden."""
    return _URL_PASSWORD.sub(r"\1:***@", url)
