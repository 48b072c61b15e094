# syntax=docker/dockerfile:1.7
# Triton for the cpu-dev overlay: the tritonserver binary and Python backend that the nvidia-pytriton
# wheel ships (the same server `make up` and CI run), plus ONNX Runtime and CPU torch for the `cpu`
# model profile, whose Python-backend models load the very same model.onnx / model.pt files.
# The production overlay (gpu-t4) uses the NGC image instead; this one has no CUDA and is ~2 GB.
#
# Build from the repository root:
#   docker build -f k8s/docker/triton-cpu.Dockerfile -t ghcr.io/recserve/triton-cpu:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 recserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin recserve
COPY constraints.txt /tmp/constraints.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c /tmp/constraints.txt \
      --extra-index-url https://download.pytorch.org/whl/cpu \
      nvidia-pytriton onnxruntime numpy torch
# Lay the wheel's server out the way a Triton install looks (/opt/tritonserver/{bin,backends}); the
# Python backend needs the stub built for this interpreter's minor version next to libtriton_python.so.
RUN SITE=$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
 && ln -s "$SITE/pytriton/tritonserver" /opt/tritonserver \
 && cp "$SITE/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub" \
       "$SITE/pytriton/tritonserver/backends/python/" \
 && ln -s "$SITE/nvidia_pytriton.libs" /opt/tritonserver-libs
ENV PATH=/opt/venv/bin:/opt/tritonserver/bin:$PATH \
    LD_LIBRARY_PATH=/opt/tritonserver-libs \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
USER 10001:10001
EXPOSE 8000 8001 8002
# /opt/tritonserver/backends is the default backend directory, so no flag is needed.
ENTRYPOINT ["tritonserver"]
