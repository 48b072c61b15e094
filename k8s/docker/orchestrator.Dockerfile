# syntax=docker/dockerfile:1.7
# The online image: the orchestrator and nothing it does not run. The package's default dependencies
# are the online set (onnxruntime, faiss-cpu, redis, tritonclient, FastAPI); torch lives only in the
# `export` extra, which this image never installs.
#
# Build from the repository root:
#   docker build -f k8s/docker/orchestrator.Dockerfile -t ghcr.io/recserve/orchestrator:0.1.0 .
# Pin the base by digest at release time (docker buildx imagetools inspect python:3.11.10-slim-bookworm).
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml constraints.txt README.md ./
COPY orchestrator ./orchestrator
COPY export ./export
COPY loadtest ./loadtest
# A wheel install (not editable): the runtime stage copies only the venv, not the source tree.
# The telemetry extra: OpenTelemetry, imported only when RECSERVE_TELEMETRY_OTLP_ENDPOINT turns tracing on.
RUN /opt/venv/bin/pip install -c constraints.txt ".[telemetry]"
# Fail the build, not a pod, if a dependency ever drags torch into the online image.
RUN if /opt/venv/bin/python -c "import torch" 2>/dev/null; then \
      echo "torch must not be in the online image (it belongs to the export extra)"; exit 1; fi

# stack/argv_secret.c as a shared library: the Triton Deployment's init container copies it from this image
# and tritonserver preloads it, so that the admin key never appears in its command line
# (k8s/base/triton/deployment.yaml). Built with only glibc symbols old enough for the NGC Triton image.
FROM ${PYTHON_IMAGE} AS argv-secret
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY stack/argv_secret.c /src/argv_secret.c
RUN gcc -shared -fPIC -O2 -Wall -Werror -o /src/argv_secret.so /src/argv_secret.c

FROM ${PYTHON_IMAGE}
# Fixed uid/gid so that the pod's runAsUser/fsGroup (10001) match the files' owner.
RUN groupadd --system --gid 10001 recserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin recserve
COPY --from=build /opt/venv /opt/venv
COPY --from=argv-secret /src/argv_secret.so /opt/recserve/argv_secret.so
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
EXPOSE 8080
# One worker per pod: Prometheus counters stay in one process, and scaling is the HPA's job.
# The app is built by a factory (wiring happens in the lifespan, nothing at import time): --factory.
# --http: httptools with the header, time and connection limits of RECSERVE_LIMITS_* (orchestrator/edge.py).
ENTRYPOINT ["uvicorn", "--factory", "orchestrator.app:create_app", "--host", "0.0.0.0", "--port", "8080", \
            "--loop", "uvloop", "--http=orchestrator.edge:EdgeHttpProtocol", "--timeout-graceful-shutdown", "20", "--no-access-log"]
