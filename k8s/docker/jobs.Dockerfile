# syntax=docker/dockerfile:1.7
# The offline image for the k8s Jobs (export, feature load, pre-compute): the package with the
# `export` extra (torch, CPU build). The source tree lives at /app and is installed editable, so
# export's REPO_ROOT is /app: artifacts go to /app/build and model files into /app/model_repository,
# both volumes in the Job manifests (the root filesystem stays read-only).
#
# Build from the repository root:
#   docker build -f k8s/docker/jobs.Dockerfile -t ghcr.io/recserve/jobs:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 recserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin recserve
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY orchestrator ./orchestrator
COPY export ./export
COPY loadtest ./loadtest
COPY model_repository ./model_repository
# The CPU torch wheel index: the default index resolves torch to the CUDA build (gigabytes of wheels)
# that a CPU-only training Job never uses.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c constraints.txt \
      --extra-index-url https://download.pytorch.org/whl/cpu -e ".[export]"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
ENTRYPOINT ["python", "-m", "export"]
