"""`config` (`tandem doctor -f CONFIG`): the config's static checks, and its timeout."""

from __future__ import annotations

from pathlib import Path

import yaml

from app.doctor.static import check_config, remote_prefill_timeout_s


def test_a_valid_config_passes_and_gives_its_remote_prefill_timeout(tmp_path: Path) -> None:
    path = tmp_path / "graph.yaml"
    path.write_text(yaml.safe_dump({"VllmWorker": {"engine": "mocker", "remote-prefill-timeout-s": 12}}))
    check, config = check_config(str(path))
    assert check.ok, check
    assert remote_prefill_timeout_s(config) == 12


def test_a_bad_key_fails_naming_the_service_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "graph.yaml"
    path.write_text(yaml.safe_dump({"Router": {"polcy": "kv"}, "Nobody": {}}))
    check, _config = check_config(str(path))
    assert not check.ok
    assert "Router: unknown key 'polcy'" in check.message and "unknown service 'Nobody'" in check.message


def test_without_a_config_the_timeout_is_the_default() -> None:
    assert remote_prefill_timeout_s(None) == 30.0
