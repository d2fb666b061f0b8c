# syntax=docker/dockerfile:1.6
# Three images from one file:
#   docker build --target backend    -t maskinv-backend    .   # HTTP backend, no torch (python:3.11-slim)
#   docker build --target worker     -t maskinv-worker     .   # GPU worker (PyTorch CUDA runtime image)
#   docker build --target worker-cpu -t maskinv-worker-cpu .   # CPU worker (python:3.11-slim + PyTorch CPU wheels);
#       it also holds the backend and the tiny scene model + captioner (assets/), so it runs the offline demo
# docker-compose.yml builds them (profiles gpu, cpu, demo).

ARG PYTHON_IMAGE=python:3.11-slim
ARG WORKER_BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS backend
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY worker ./worker
COPY label_config ./label_config
RUN pip install ".[backend]" \
 && useradd --uid 1000 --create-home maskinv
USER maskinv
ENV MASKINV_HOST=0.0.0.0 MASKINV_PORT=9090
EXPOSE 9090
# ready=1: 503 (the check fails) while no worker is alive in queue mode
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health?ready=1' % os.environ.get('MASKINV_PORT', '9090'), timeout=4)"
CMD ["maskinv-backend"]

# ---------------------------------------------------------------------------------------------------------
FROM ${WORKER_BASE} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/huggingface XDG_CACHE_HOME=/models/cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY worker ./worker
# torch/torchvision come with the base image (pip keeps them: they satisfy the worker extra's ranges)
RUN pip install ".[worker]" && mkdir -p /models
VOLUME ["/models"]
ENV MASKINV_DEVICE=cuda
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 CMD ["maskinv-worker", "--check"]
CMD ["maskinv-worker"]

# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS worker-cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/huggingface XDG_CACHE_HOME=/models/cache
WORKDIR /app
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY worker ./worker
COPY label_config ./label_config
# the offline demo's model (README.md, "Offline demo"; docs/scene_world.md): ~8 MB
COPY assets/tiny_scene_clip/maskinv-scene-tiny.safetensors ./assets/tiny_scene_clip/
COPY assets/tiny_clipcap ./assets/tiny_clipcap
# CPU wheels first (no CUDA libraries), in the worker extra's ranges; then the worker and the backend
RUN pip install --index-url ${TORCH_INDEX} "torch>=2.2,<2.15" "torchvision>=0.17,<0.30" \
 && pip install ".[worker,backend]" \
 && useradd --uid 1000 --create-home maskinv \
 && mkdir -p /models /data && chown maskinv /models /data
USER maskinv
VOLUME ["/models"]
ENV MASKINV_DEVICE=cpu MASKINV_HOST=0.0.0.0 MASKINV_PORT=9090
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 CMD ["maskinv-worker", "--check"]
CMD ["maskinv-worker"]
