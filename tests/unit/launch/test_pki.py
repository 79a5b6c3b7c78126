"""The CA, certificates and secrets of `tandem infra up --secure`: owner-only, and good for the hosts asked."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509

from app.launch import pki


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_server_certificate_is_signed_by_the_ca_for_every_host_and_all_is_owner_only(tmp_path: Path) -> None:
    folder = tmp_path / "secure"
    ca_cert, ca_key = folder / "ca.pem", folder / "ca-key.pem"
    pki.ensure_ca(ca_cert, ca_key)
    first_ca = ca_cert.read_bytes()
    pki.ensure_ca(ca_cert, ca_key)  # kept: every node already trusts it
    assert ca_cert.read_bytes() == first_ca

    cert_path, key_path = folder / "nats.pem", folder / "nats-key.pem"
    pki.issue_server_cert(ca_cert, ca_key, cert_path, key_path, ["10.0.0.1", "127.0.0.1", "head.example"])
    ca = x509.load_pem_x509_certificate(first_ca)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.1"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert names.get_values_for_type(x509.DNSName) == ["head.example"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    assert _mode(folder) == 0o700
    assert {path.name: _mode(path) for path in folder.iterdir()} == {
        name: 0o600 for name in ("ca.pem", "ca-key.pem", "nats.pem", "nats-key.pem")
    }


def test_a_password_is_made_once_random_and_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "secure" / "nats-password"
    password = pki.ensure_password(path)
    assert len(password) >= 24 and password.replace("-", "").replace("_", "").isalnum()
    assert pki.ensure_password(path) == password
    assert pki.ensure_password(tmp_path / "secure" / "other") != password
    assert _mode(path) == 0o600
