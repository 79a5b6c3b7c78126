"""RuntimeSettings: the seed's NATS_SERVER and ETCD_ENDPOINTS, read as the guide spells them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.settings import RuntimeSettings


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
