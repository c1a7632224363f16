# syntax=docker/dockerfile:1
#
# Two images from one file; the last stage is the default:
#   docker build -t unet-service:cuda .               # GPU: CUDA PyTorch runtime base
#   docker build -t unet-service:cpu --target cpu .   # CPU only: slim Python base
# Both run `unet-serve` on port 8000 with the shipped ISBI 2012 weights baked in.

# One torch release for both images: the CPU target installs it, the CUDA base ships it, so
# both images compute with the same code. Override CUDA_BASE for another CUDA version.
ARG TORCH_VERSION=2.13.0
ARG CUDA_BASE=pytorch/pytorch:${TORCH_VERSION}-cuda12.6-cudnn9-runtime
ARG PYTHON_BASE=python:3.11-slim-bookworm

# Only the wheel leaves this stage: setuptools, the build tree and the sources stay behind.
FROM ${PYTHON_BASE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY app/ app/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .


FROM ${PYTHON_BASE} AS cpu
ARG TORCH_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from the CPU-only index: the default PyPI wheel would pull in gigabytes of CUDA
# libraries that this image never uses.
RUN pip install --no-cache-dir torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu
# A bind mount rather than COPY, so the wheel file is not left in a layer.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl
RUN useradd --system --uid 10001 --user-group --create-home unet
COPY weights/isbi2012.safetensors weights/isbi2012.json /opt/unet/weights/
ENV UNET_WEIGHTS=/opt/unet/weights/isbi2012.safetensors \
    UNET_DEVICE=cpu \
    UNET_HOST=0.0.0.0 \
    UNET_PORT=8000
WORKDIR /home/unet
USER 10001:10001
EXPOSE 8000
# Slim images have no curl; urlopen raises (exit 1) on a refused connection or any non-2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('UNET_PORT', '8000'), timeout=4)"]
# Exec form: unet-serve is PID 1 and receives SIGTERM itself, so uvicorn drains in-flight work.
ENTRYPOINT ["unet-serve"]


FROM ${CUDA_BASE} AS cuda
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The base already has CUDA torch, which satisfies the project's torch requirement, so pip
# installs only the remaining dependencies.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl
RUN useradd --system --uid 10001 --user-group --create-home unet
COPY weights/isbi2012.safetensors weights/isbi2012.json /opt/unet/weights/
ENV UNET_WEIGHTS=/opt/unet/weights/isbi2012.safetensors \
    UNET_DEVICE=auto \
    UNET_HOST=0.0.0.0 \
    UNET_PORT=8000
WORKDIR /home/unet
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('UNET_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["unet-serve"]
