# Two images from one file; the last stage is the default:
#   docker build -t unet-service:cuda .               # GPU: CUDA PyTorch runtime base
#   docker build -t unet-service:cpu --target cpu .   # CPU only: slim Python base
# Both run `unet-serve` on port 8000 with the shipped ISBI 2012 weights baked in. Every
# dependency but torch comes from requirements/serve.txt, the lock, with its hashes checked,
# so two builds of one commit install the same versions. (No `# syntax=` line: nothing here
# needs more than the frontend built into Docker and podman, and an offline build could not
# fetch another one.)

# One torch release for both images: the CPU target installs it, the CUDA base ships it, so
# both images compute with the same code. It matches the Makefile's TORCH_VERSION, the release
# the lock's copies of torch's own dependencies were resolved for. Override CUDA_BASE for
# another CUDA version.
ARG TORCH_VERSION=2.13.0
# Where the CPU target gets torch: PyTorch's CPU-only index, since PyPI's Linux wheel brings
# gigabytes of CUDA libraries that the image never uses. A mirror, or a local index for an
# offline build (deploy/image-check makes one), is --build-arg TORCH_INDEX=URL.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG CUDA_BASE=pytorch/pytorch:${TORCH_VERSION}-cuda12.6-cudnn9-runtime
ARG PYTHON_BASE=python:3.11-slim-bookworm

# Only the wheel leaves this stage: setuptools, the build tree and the sources stay behind.
# training/ too (pure Python, a few hundred kB): the project's unet-train and unet-eval
# commands then work in the images, whose lock installs scipy (scikit-image needs it).
FROM ${PYTHON_BASE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY unet_service/ unet_service/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .


# strip, for the install steps below, without a build tool left in either image. This stage
# packs Debian's strip with the libraries and the loader it runs with into /kit, so that it
# runs over any base, the CUDA one included; each image copies the kit in and deletes it in
# the install step that uses it last (its COPY layer, 5 MB, stays). It is not mounted with
# RUN --mount=from=binutils instead: podman 4.3, Debian 12's, mounts a cached stage's base
# image in place of the stage, and keys no cache on what a mount holds. The shared libraries
# that the wheels bring carry symbol tables and, some, debug information: strip
# --strip-unneeded drops them (about 100 MB from torch, 75 MB from the lock's packages) and
# keeps the dynamic symbols that loading and linking use.
FROM ${PYTHON_BASE} AS binutils
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# binutils unpinned: the base's Debian release fixes its version, and no file of it but the
# kit reaches an image. The script's $0 and $@ are meant for the script (single quotes).
# hadolint ignore=DL3008,SC2016
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /kit/lib \
    && cp "$(readlink -f /usr/bin/strip)" /kit/strip.bin \
    && for lib in $(ldd /usr/bin/strip | grep -o '/[^ ]*'); do \
        cp "$(readlink -f "$lib")" "/kit/lib/${lib##*/}"; \
    done \
    && loader=$(readelf -l /usr/bin/strip | sed -n 's/.*interpreter: \(.*\)]$/\1/p') \
    && printf '#!/bin/sh\nkit=${0%%/*}\nexec "$kit/lib/%s" --library-path "$kit/lib" "$kit/strip.bin" "$@"\n' \
        "${loader##*/}" >/kit/strip \
    && chmod 755 /kit/strip \
    && /kit/strip --version


FROM ${PYTHON_BASE} AS cpu
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch alone (--no-deps: the lock has its dependencies), in a layer of its own that the
# frequent lock changes leave cached. Deleted in the same layer (a later one could not shrink
# the image), about 160 MB that nothing in this image can use: torch's C++ test programs
# (torch/test; *Test and test_* in torch/bin), and what only building C++ against torch needs
# (torch/include, torch/share/cmake and torch/bin/protoc*), since the image has no C++
# compiler. (Without one, torch.compile has no CPU backend either, with or without the
# headers: UNET_COMPILE is not for this image.) Its shared libraries are stripped: 99 MB.
COPY --from=binutils /kit /tmp/strip-kit
RUN pip install --no-cache-dir --no-deps torch==${TORCH_VERSION} --index-url ${TORCH_INDEX} \
    && torch=$(python -c "import importlib.util as u; print(u.find_spec('torch').origin)") \
    && torch=${torch%/*} \
    && rm -rf "$torch"/test "$torch"/bin/*Test "$torch"/bin/test_* "$torch"/bin/protoc* \
        "$torch"/include "$torch"/share/cmake \
    && find "$torch" -type f -name '*.so*' -exec /tmp/strip-kit/strip --strip-unneeded {} +
# COPY rather than a bind mount, though the files (under 100 kB) stay in a layer: podman and
# buildah key their layer cache on what a COPY brings but not on a mount's contents, so a new
# lock or a new wheel would otherwise be built over a stale layer.
WORKDIR /src
COPY requirements/serve.txt requirements/
# The lock, slimmed in the same layer, and only in what this step installed (the files whose
# inode changed after the stamp): rewriting a file of a lower layer, torch's, would copy it
# into this one. Gone: the packages' own test suites and benchmarks (`tests` and `benchmarks`
# folders, about 100 MB: sympy, scipy, numpy, networkx, mpmath), the ONNX backend test suite
# and its data (onnx/backend/test, 18 MB), none of which the packages import to run; and
# the shared libraries' symbol tables and debug information (strip, about 75 MB). Not
# stripped: the libraries that auditwheel bundled into NAME.libs/ folders, which patchelf
# has rewritten; strip leaves some of them unloadable (numpy's and scipy's OpenBLAS and
# gfortran: "ELF load command address/offset not page-aligned"). The .pyc files pip compiles
# (about 150 MB) stay: without them every start compiles what it imports again, as a user
# that cannot write them (the service's imports took 4.3 s instead of 1.7 s on a 2-core
# machine).
RUN touch /tmp/before-lock \
    && pip install --no-cache-dir --require-hashes -r requirements/serve.txt \
    && site=$(python -c "import sysconfig; print(sysconfig.get_path('platlib'))") \
    && rm -rf "$site"/onnx/backend/test \
    && find "$site" -cnewer /tmp/before-lock -type d \( -name tests -o -name benchmarks \) \
        -prune -exec rm -rf {} + \
    && find "$site" -cnewer /tmp/before-lock -type f -name '*.so*' ! -path '*.libs/*' \
        -exec /tmp/strip-kit/strip --strip-unneeded {} + \
    && rm -rf /tmp/before-lock /tmp/strip-kit
COPY --from=wheel /wheels /src/wheels
RUN pip install --no-cache-dir --no-deps /src/wheels/*.whl \
    && pip check
# The group first, with the same id as the user: `USER 10001:10001` and the Kubernetes
# runAsUser/runAsGroup/fsGroup then name an existing user and group, which own the home folder.
# --no-log-init: no lastlog/faillog records, sparse files that a high uid makes large.
RUN groupadd --gid 10001 unet \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home unet \
    && install -d -o 10001 -g 10001 /var/lib/unet/jobs
COPY weights/isbi2012.safetensors weights/isbi2012.json /opt/unet/weights/
# Section jobs' uploads, results and job table: a volume, so they outlive the container
# (and replicas on one host can share it).
VOLUME /var/lib/unet/jobs
ENV UNET_JOBS_DIR=/var/lib/unet/jobs \
    UNET_WEIGHTS=/opt/unet/weights/isbi2012.safetensors \
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
# The base ships CUDA torch, which the project's torch requirement accepts; the lock brings
# everything else, torch's own dependencies at the versions the lock was resolved with,
# slimmed as in the CPU image (the base's own files, its torch among them, stay as they are).
WORKDIR /src
COPY --from=binutils /kit /tmp/strip-kit
COPY requirements/serve.txt requirements/
RUN touch /tmp/before-lock \
    && pip install --no-cache-dir --require-hashes -r requirements/serve.txt \
    && site=$(python -c "import sysconfig; print(sysconfig.get_path('platlib'))") \
    && rm -rf "$site"/onnx/backend/test \
    && find "$site" -cnewer /tmp/before-lock -type d \( -name tests -o -name benchmarks \) \
        -prune -exec rm -rf {} + \
    && find "$site" -cnewer /tmp/before-lock -type f -name '*.so*' ! -path '*.libs/*' \
        -exec /tmp/strip-kit/strip --strip-unneeded {} + \
    && rm -rf /tmp/before-lock /tmp/strip-kit
COPY --from=wheel /wheels /src/wheels
RUN pip install --no-cache-dir --no-deps /src/wheels/*.whl \
    && pip check
RUN groupadd --gid 10001 unet \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home unet \
    && install -d -o 10001 -g 10001 /var/lib/unet/jobs
COPY weights/isbi2012.safetensors weights/isbi2012.json /opt/unet/weights/
# Section jobs' uploads, results and job table: a volume, so they outlive the container
# (and replicas on one host can share it).
VOLUME /var/lib/unet/jobs
ENV UNET_JOBS_DIR=/var/lib/unet/jobs \
    UNET_WEIGHTS=/opt/unet/weights/isbi2012.safetensors \
    UNET_DEVICE=auto \
    UNET_HOST=0.0.0.0 \
    UNET_PORT=8000
WORKDIR /home/unet
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('UNET_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["unet-serve"]
