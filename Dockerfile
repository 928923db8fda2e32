# syntax=docker/dockerfile:1
#
# Two images from one file (BuildKit):
#
#   docker build --target operator -t ghcr.io/dreambooth-operator/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/dreambooth-operator/trainer:0.1.0 .
#
# Every pip install takes its versions from constraints.txt, the project's pins (the same
# file `make` installs with). constraints.txt pins torch==2.13.0 without a local label
# (`make lock` strips "+cpu"): PEP 440 lets "==2.13.0" match the CUDA build 2.13.0+cu128,
# so the trainer image installs the CUDA torch of exactly that version from PyTorch's index
# and the pin still holds. tests/chart/test_dockerfile.py checks the pins, the files this
# build reads, the users and the entry points (no Docker engine runs in CI).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# PyTorch's wheel index for the CUDA build of torch (cu128: CUDA 12.8; the NVIDIA driver it
# needs: docs/deploy.md, "Drivers"). The wheel brings the CUDA runtime, cuDNN, cuBLAS, NCCL,
# ... as nvidia-* pip packages: the trainer builds on plain Python, so those libraries ship
# once (a nvidia/cuda base image would be a second copy that torch never loads).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# --------------------------------------------------------------------------- the wheel
# The project as a wheel, built once; the runtime images get no sources.
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dreambooth ./dreambooth
RUN pip wheel --no-deps --wheel-dir /wheels .

# --------------------------------------------------------------------------- operator
# The kopf operator and the gallery (`dreambooth gallery`): slim Python, no torch (`.[operator,gallery]` only).
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp
RUN --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
 && pip install --constraint /tmp/constraints.txt "$(ls /wheels/dreambooth_operator-*.whl)[operator,gallery]" \
 && ! pip show torch diffusers transformers >/dev/null 2>&1 \
 && groupadd --gid 1000 dreambooth \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin dreambooth
# Numeric, so that the kubelet can check runAsNonRoot.
USER 1000:1000
# /metrics (DREAMBOOTH_METRICS_PORT) and kopf's /healthz (DREAMBOOTH_HEALTH_PORT)
EXPOSE 8080 8081
ENTRYPOINT ["dreambooth-operator"]

# --------------------------------------------------------------------------- trainer
# The trainer: slim Python, CUDA torch (with its own CUDA libraries), diffusers,
# transformers, accelerate, peft, bitsandbytes (`.[trainer]`). The NVIDIA driver (libcuda)
# comes from the node: the NVIDIA container toolkit mounts it when the device plugin gives
# the pod GPUs.
FROM ${PYTHON_IMAGE} AS trainer
ARG TORCH_INDEX_URL
ENV DEBIAN_FRONTEND=noninteractive
# What the CUDA wheels still take from the OS: rdma-core's verbs library and its providers
# (mlx5, ...), which NCCL loads for InfiniBand/RoCE; without them NCCL falls back to TCP.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libibverbs1 ibverbs-providers \
 && rm -rf /var/lib/apt/lists/*
# NVIDIA_DRIVER_CAPABILITIES: what of the driver the toolkit mounts (nvidia/cuda images set
# it; CUDA needs compute, nvidia-smi utility). NVIDIA_VISIBLE_DEVICES is left to the device
# plugin: an image that says "all" would see every GPU of the node where the runtime allows.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# torch first, from PyTorch's CUDA index (PyPI as the fallback for its dependencies), at
# the version constraints.txt pins; then the trainer, which keeps that torch. The build
# fails on a CPU torch, and if any CUDA library exists outside the venv's nvidia-* packages.
RUN --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
 && pip install --constraint /tmp/constraints.txt \
        --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple torch \
 && pip install --constraint /tmp/constraints.txt "$(ls /wheels/dreambooth_operator-*.whl)[trainer]" \
 && python -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build: ' + torch.__version__" \
 && test -n "$(find /opt/venv -name 'libcudart.so*' -print -quit)" \
 && test -z "$(find / -xdev -path /opt/venv -prune -o \( -name 'libcudart.so*' -o -name 'libcudnn*.so*' -o -name 'libcublas*.so*' -o -name 'libnccl.so*' \) -print)"
# Writable places for a non-root user with a read-only root filesystem: the operator's pods
# mount emptyDirs on /tmp and /var/cache/dreambooth (dreambooth/operator/resources.py:
# WORKDIR, CACHE_DIR); these are the same paths for `docker run`.
ENV HOME=/var/cache/dreambooth \
    XDG_CACHE_HOME=/var/cache/dreambooth/.cache \
    HF_HOME=/var/cache/dreambooth/huggingface \
    TRITON_CACHE_DIR=/var/cache/dreambooth/.cache/triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    DREAMBOOTH_WORKDIR=/tmp/dreambooth
RUN (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --no-create-home \
        --home-dir /var/cache/dreambooth --shell /usr/sbin/nologin dreambooth) \
 && mkdir -p /var/cache/dreambooth /tmp/dreambooth \
 && chown -R 1000:1000 /var/cache/dreambooth /tmp/dreambooth
VOLUME ["/var/cache/dreambooth", "/tmp"]
WORKDIR /tmp/dreambooth
USER 1000:1000
# rank 0's /metrics (trainer.metricsPort) and the torch.distributed rendezvous
EXPOSE 9090 29500
ENTRYPOINT ["python", "-m", "dreambooth.trainer"]
