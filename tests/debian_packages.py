"""Debian packages a test tier installs on a fresh machine (CI's is one), as root."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping


class MissingPackagesError(RuntimeError):
    pass


def install_missing(packages: Mapping[str, str], also: set[str] | frozenset[str] = frozenset()) -> None:
    """apt-get install each package whose command (`packages`: command -> package) is not on
    PATH, and the packages of `also`."""
    missing = sorted({pkg for command, pkg in packages.items() if shutil.which(command) is None} | also)
    if not missing:
        return
    if os.geteuid() != 0:
        raise MissingPackagesError(f"these tests need {', '.join(missing)}; run them as root or apt-get install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", *missing]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise MissingPackagesError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
