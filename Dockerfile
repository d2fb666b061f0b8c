# syntax=docker/dockerfile:1.6
# Two images from one file:
#   docker build --target backend -t maskinv-backend .   # HTTP backend, no torch (python:3.11-slim)
#   docker build --target worker  -t maskinv-worker  .   # GPU worker (PyTorch CUDA runtime image)
# docker-compose.yml builds both.

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
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MASKINV_PORT', '9090'), timeout=4)"
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
