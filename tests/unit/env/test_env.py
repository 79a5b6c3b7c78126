"""The environment variable registry: every variable declared once, read through it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from app import env
from app.settings import RuntimeSettings

REPO = Path(__file__).resolve().parents[3]
# Where the variables are read: Tandem's code, the image and the host's files.
READERS = ("app", "entrypoints", "env", "compose", "scripts", "Makefile", "Dockerfile")
# Build arguments of the Dockerfile, not environment variables.
BUILD_ARGUMENTS = {"TANDEM_UID"}


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", *READERS], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / name for name in listed.stdout.split() if (REPO / name).is_file()]


def test_every_tandem_variable_in_the_tree_is_declared() -> None:
    used = set()
    for path in _tracked_files():
        used |= set(re.findall(r"\bTANDEM_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")))
    assert used - BUILD_ARGUMENTS - set(env.VARIABLES) == set()


def test_no_code_reads_the_environment_but_the_registry() -> None:
    readers = []
    for path in _tracked_files():
        if path.suffix == ".py" and path.name != "env.py":
            for number, line in enumerate(path.read_text().splitlines(), 1):
                # Reads only: handing variables to vLLM or Ray (os.environ[...] = ...) and
                # copying the whole environment for a child are not reads.
                if re.search(r"os\.getenv|os\.environ\.get|os\.environ\[[^]]+\](?!\s*=)", line):
                    readers.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert readers == []


def test_values_are_read_when_asked_for_and_bad_ones_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_REPLICA", "3")
    assert env.TANDEM_REPLICA.get() == 3
    monkeypatch.setenv("TANDEM_REPLICA", "")  # empty is unset: compose env files make `X=` easy
    assert env.TANDEM_REPLICA.get() == 0
    assert env.NATS_PORT.get({"NATS_PORT": "4333"}) == 4333
    with pytest.raises(env.EnvError, match=r"NATS_PORT='42x' is not a whole number between 1 and 65535"):
        env.NATS_PORT.get({"NATS_PORT": "42x"})
    with pytest.raises(env.EnvError, match="TANDEM_STOP_WAIT_S='0'"):
        env.TANDEM_STOP_WAIT_S.get({"TANDEM_STOP_WAIT_S": "0"})


def test_runtime_settings_take_names_defaults_and_docs_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in RuntimeSettings.model_fields.values():
        variable = env.VARIABLES[str(field.validation_alias)]
        assert (field.default, field.description) == (variable.default, variable.doc)
    monkeypatch.setenv("NATS_SERVER", "nats://10.0.0.1:4222")
    monkeypatch.setenv("TANDEM_NAMESPACE", "blue")
    settings = RuntimeSettings()
    assert (settings.nats_server, settings.namespace) == ("nats://10.0.0.1:4222", "blue")
    assert RuntimeSettings(namespace="green").namespace == "green"


def test_tandem_config_env_lists_every_variable() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "tandem"), "config", "env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line and not line.startswith("#")}
    assert set(rows) == set(env.VARIABLES)
    assert re.fullmatch(r"NATS_PORT\s+port\s+4222\s+NATS client port on a node that runs NATS", rows["NATS_PORT"])
