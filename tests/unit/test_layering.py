"""Which packages may import which: the base layers import nothing above them.

Each check imports a package in a fresh interpreter and lists the Tandem modules it pulled in.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def tandem_modules_loaded_by(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m == 'app' or m.startswith('app.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize(
    ("module", "may_load"),
    [
        ("app.protocol", ("app.protocol",)),  # the runtime imports the protocol, not the other way round
        ("app.protocol.names", ("app.protocol",)),
        ("app.tunables", ("app.tunables",)),  # declarations come from their owners, the runtime as an argument
    ],
)
def test_a_base_package_imports_only_itself(module: str, may_load: tuple[str, ...]) -> None:
    loaded = tandem_modules_loaded_by(module) - {"app"}
    assert {m for m in loaded if not m.startswith(may_load)} == set()


def test_the_http_layer_does_not_import_the_text_pipeline() -> None:
    # app.preprocess imports app.openai (the request schema); the reverse would be a cycle.
    assert not any(m.startswith("app.preprocess") for m in tandem_modules_loaded_by("app.openai"))


def test_the_router_replica_knows_nothing_of_the_runtime() -> None:
    # It hears the fleet through a FleetFeed (app/router/feed.py); the feed over the runtime
    # is app.router.runtime_feed, which `app.router` does not import.
    assert not any(m.startswith("app.runtime") for m in tandem_modules_loaded_by("app.router"))
