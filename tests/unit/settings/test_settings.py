"""RuntimeSettings: the seed's NATS_SERVER and ETCD_ENDPOINTS, read as the guide spells them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.settings import RuntimeSettings, redact_url


def test_the_guides_two_exports_are_what_every_process_connects_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_SERVER", "nats://10.0.0.1:4222")
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://10.0.0.1:2379,10.0.0.2")
    settings = RuntimeSettings()
    assert settings.nats_urls() == ["nats://10.0.0.1:4222"]
    assert settings.etcd_urls() == ["10.0.0.1:2379", "10.0.0.2:2379"]


def test_an_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_NAMESPACE", "")
    assert RuntimeSettings().namespace == RuntimeSettings.model_fields["namespace"].default


def test_a_nats_url_without_its_scheme_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_SERVER", "10.0.0.1:4222")
    with pytest.raises(ValidationError, match="NATS_SERVER must start with nats://"):
        RuntimeSettings()


def test_a_lease_too_short_to_keep_alive_is_refused() -> None:
    with pytest.raises(ValidationError):
        RuntimeSettings(lease_ttl_s=1)


def test_secure_exports_are_read_and_incomplete_ones_are_refused_naming_the_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "NATS_SERVER": "tls://tandem@10.0.0.1:4222",
        "NATS_PASSWORD_FILE": "/run/secrets/nats-password",
        "NATS_TLS_CA": "/run/secrets/ca.pem",
        "ETCD_ENDPOINTS": "https://10.0.0.1:2379",
        "ETCD_USER": "tandem",
        "ETCD_PASSWORD_FILE": "/run/secrets/etcd-password",
        "ETCD_TLS_CA": "/run/secrets/ca.pem",
    }.items():
        monkeypatch.setenv(name, value)
    settings = RuntimeSettings()
    assert (settings.nats_password_file, settings.etcd_user, settings.etcd_tls()) == (
        "/run/secrets/nats-password",
        "tandem",
        True,
    )
    refusals = {
        "NATS_PASSWORD_FILE is set: name its user in NATS_SERVER": {"NATS_SERVER": "tls://10.0.0.1:4222"},
        "NATS_TLS_CA is set: NATS_SERVER must use tls://": {"NATS_SERVER": "nats://tandem@10.0.0.1:4222"},
        "ETCD_TLS_CA is set: ETCD_ENDPOINTS must use https://": {"ETCD_ENDPOINTS": "http://10.0.0.1:2379"},
        "ETCD_ENDPOINTS mixes https:// with plain endpoints": {"ETCD_ENDPOINTS": "https://a:2379,b:2379"},
        "ETCD_ENDPOINTS uses https://: set ETCD_TLS_CA": {"ETCD_TLS_CA": ""},
        "ETCD_USER and ETCD_PASSWORD_FILE go together": {"ETCD_PASSWORD_FILE": ""},
        "NATS_TLS_CERT and NATS_TLS_KEY go together": {"NATS_TLS_CERT": "/run/secrets/client.pem"},
    }
    for message, changes in refusals.items():
        with monkeypatch.context() as patch:
            for name, value in changes.items():
                patch.setenv(name, value)
            with pytest.raises(ValidationError, match=message):
                RuntimeSettings()


def test_a_password_in_nats_server_is_never_shown() -> None:
    settings = RuntimeSettings(nats_server="tls://tandem:s3cret@10.0.0.1:4222,nats://10.0.0.2:4222")
    assert settings.nats_server_redacted() == "tls://tandem:***@10.0.0.1:4222,nats://10.0.0.2:4222"
    assert redact_url("nats://token@h:4222") == "nats://token@h:4222"  # a user (or token) alone
    assert redact_url("tandem:s3cret@h:4222") == "tandem:***@h:4222"
    with pytest.raises(ValidationError) as refused:
        RuntimeSettings(nats_server="tandem:s3cret@10.0.0.1:4222")
    assert "s3cret" not in str(refused.value)
