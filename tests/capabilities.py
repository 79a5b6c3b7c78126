"""Tests that need what a machine may lack (root, for network namespaces and mounts).

On a developer's machine without it they are skipped. Where CI runs them (`CI` set, as
CI services set it: `CI=true`), the same lack fails them instead: a CI run must not pass
by not running a tier.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.netns import Fabric

FABRIC = "root, ip and unshare (network namespaces)"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(available: bool, what: str) -> None:
    """Go on where `available`; else skip the calling test or fixture, or fail it under CI."""
    if available:
        return
    if in_ci():
        pytest.fail(f"CI runs this test, and this machine lacks {what}", pytrace=False)
    pytest.skip(f"needs {what}")


def require_fabric() -> None:
    """What tests/netns.py's Fabric needs."""
    require(Fabric.available(), FABRIC)


def require_root_unshare() -> None:
    require(os.geteuid() == 0 and shutil.which("unshare") is not None, "root and unshare")
