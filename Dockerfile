# syntax=docker/dockerfile:1.7
# Two targets:
#   docker build --target cpu -t medask:cpu .   # runs the embedded default on any x86_64 machine
#   docker build --target gpu -t medask:gpu .   # CUDA: GPTQ weights through GPTQModel's CUDA kernels
# The model folder is baked in from model_artifacts/default; mount another at
# /models/medask and set MEDASK_MODEL_DIR to serve a different checkpoint.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# gptqmodel 7.6.0 JIT-compiles its kernels (ninja + g++; nvcc for the CUDA ones) on first use,
# so the GPU target starts from CUDA's *devel* image. Not yet verified on a GPU from this project.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

########## CPU ##########
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    MEDASK_HOST=0.0.0.0 MEDASK_PORT=8000 MEDASK_MODEL_DIR=/models/medask
RUN apt-get update && apt-get install -y --no-install-recommends g++ curl && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/medask
COPY constraints.txt pyproject.toml README.md ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY app app
COPY training training
RUN PIP_CONSTRAINT=constraints.txt pip install .
COPY model_artifacts/default /models/medask
# the evidence pack is rebuilt from the vendored data and must match its committed manifest
COPY model_artifacts/evidence/manifest.json /models/evidence/manifest.json
RUN python -m training evidence --default --out /models/evidence
ENV MEDASK_EVIDENCE_DIR=/models/evidence
RUN useradd --create-home --uid 10001 medask && mkdir -p /home/medask/.cache /var/cache/medask /var/lib/medask \
    && chown -R medask /home/medask /var/cache/medask /var/lib/medask
USER medask
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD curl -fsS http://127.0.0.1:8000/ready || exit 1
# python -m app drains on SIGTERM for MEDASK_DRAIN_S (8 s) and exits 0, inside Docker's 10 s stop timeout
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]

########## GPU ##########
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    MEDASK_HOST=0.0.0.0 MEDASK_PORT=8000 MEDASK_MODEL_DIR=/models/medask MEDASK_DEVICE=cuda
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common curl g++ ninja-build \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
    && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /srv/medask
COPY constraints.txt pyproject.toml README.md ./
RUN pip install torch==2.13.0
COPY app app
COPY training training
RUN PIP_CONSTRAINT=constraints.txt pip install .
COPY model_artifacts/default /models/medask
# the evidence pack is rebuilt from the vendored data and must match its committed manifest
COPY model_artifacts/evidence/manifest.json /models/evidence/manifest.json
RUN python -m training evidence --default --out /models/evidence
ENV MEDASK_EVIDENCE_DIR=/models/evidence
RUN useradd --create-home --uid 10001 medask && mkdir -p /home/medask/.cache /var/cache/medask /var/lib/medask \
    && chown -R medask /home/medask /var/cache/medask /var/lib/medask
USER medask
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 CMD curl -fsS http://127.0.0.1:8000/ready || exit 1
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
