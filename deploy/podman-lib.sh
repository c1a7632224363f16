#!/usr/bin/env bash
# Shared by deploy/image-check and deploy/compose-check (sourced, from the project's root):
# settings, helpers, the base image (Docker Hub's python:3.11-slim-bookworm or a debootstrap
# stand-in), the runtime options this machine's podman needs, and the image build.
VENV=${VENV:-.venv}
PYTHON_BASE=${PYTHON_BASE:-docker.io/library/python:3.11-slim-bookworm}
LOCAL_BASE=${LOCAL_BASE:-localhost/unet-base:bookworm-python3.11}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SLICE=${SLICE:-../shared/data/isbi2012/train/image/00.png}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
CHECK=${CHECK:-$(basename "$0")}
work=$(mktemp -d)

say() { printf '\n== %s: %s\n' "$CHECK" "$*"; }
fail() {
  printf '%s: FAILED: %s\n' "$CHECK" "$*" >&2
  exit 1
}

# podman schedules HEALTHCHECKs with systemd timers and logs an error for each container on a
# machine without systemd; the checks run it themselves, so those lines are dropped.
podman() { command podman "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }

# A pip setting as pip resolves it (environment first, then the config files): each value.
pip_setting() {
  "$VENV/bin/python" -m pip config list 2>/dev/null \
    | sed -n "s/^[^=]*\.$1='\(.*\)'$/\1/p" | head -1 | tr ' ' '\n'
}
# Fails unless what the service returned for IMAGE (FILE) equals unet-predict's for IMAGE:
# the mask PNG, or with a third argument `instances`, the cell labels (--instances).
same_as_predict() {
  local out kind=${3:-mask}
  out=$(mktemp -d -p "$work")
  # Its progress bar goes to a file, shown only if it fails.
  "$VENV/bin/unet-predict" "$2" --output-dir "$out" ${3:+--instances} 2>"$out/stderr" || {
    cat "$out/stderr" >&2
    return 1
  }
  "$VENV/bin/python" - "$1" "$out/$(basename "${2%.*}")${3:+.instances}.png" "$kind" <<'EOF'
import sys

import numpy as np
from PIL import Image

service, predict = (np.asarray(Image.open(path)) for path in sys.argv[1:3])
kind = sys.argv[3]
assert service.shape == predict.shape, (service.shape, predict.shape)
differ = int((service != predict).sum())
what = (
    f"{len(np.unique(service)) - 1} cells" if kind == "instances"
    else f"foreground {(service > 0).mean():.4f}"
)
print(
    f"{kind} {service.shape[1]}x{service.shape[0]}: {differ} of {service.size} pixels differ "
    f"from unet-predict's; {what}"
)
sys.exit(1 if differ else 0)
EOF
}
free_port() { "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }


# The base image ($base) and the options every `podman build` and `podman run` here takes
# (runtime_opts): podman's defaults where they work.
prepare_base() {
  command -v podman >/dev/null || fail "needs podman (Debian: apt-get install podman)"
  say "base image"
  if podman image exists "$PYTHON_BASE" || timeout 120 podman pull --quiet "$PYTHON_BASE" >/dev/null 2>&1; then
    base=$PYTHON_BASE
  elif podman image exists "$LOCAL_BASE"; then
    base=$LOCAL_BASE
  else
    echo "$PYTHON_BASE cannot be pulled: making $LOCAL_BASE with debootstrap"
    command -v debootstrap >/dev/null || fail "needs debootstrap (apt-get install debootstrap)"
    [ "$(id -u)" = 0 ] || fail "debootstrap needs root"
    rootfs=$work/rootfs
    # minbase and no Recommends: no compiler, as in the slim image. python-is-python3 gives the
    # `python` that the Dockerfile's HEALTHCHECK runs; python3-pip gives `pip`.
    debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
      bookworm "$rootfs" "$DEBIAN_MIRROR"
    # As in python:3.11-slim, pip may install into the system Python (PEP 668's marker is what
    # would refuse that); the downloaded packages, apt lists, documentation and locales go.
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | podman import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$LOCAL_BASE"
    rm -rf "$rootfs"
    base=$LOCAL_BASE
  fi

  # Containers start with podman's defaults where they can. Some sandboxes (this project's
  # machines among them) refuse the default rlimits, which are above the shell's own (and there
  # above kernel.pid_max for processes), and mount cgroups in hybrid mode, which crun does not
  # support: there the build and the container run on runc with the shell's limits.
  runtime_opts=()
  if ! podman run --rm "$base" true 2>"$work/run.err"; then
    nproc=$(ulimit -Hu)
    pid_max=$(cat /proc/sys/kernel/pid_max)
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then nproc=$pid_max; fi
    runtime_opts=(--runtime runc --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)"
      --ulimit "nproc=$nproc:$nproc")
    echo "podman's defaults fail here ($(tail -1 "$work/run.err")); using: ${runtime_opts[*]}"
    command -v runc >/dev/null || fail "needs runc (apt-get install runc)"
  fi
  echo "base: $base ($(podman run --rm "${runtime_opts[@]}" "$base" python --version))"
}

# Builds the Dockerfile's target $1 as image $2 on $base (prepare_base first).
build_image() {
  local target=$1 image=$2 build_args wheel dir file cert started
  say "torch $TORCH_VERSION"
  build_args=(--build-arg "PYTHON_BASE=$base")
  if [ -n "${TORCH_INDEX:-}" ]; then
    build_args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
    echo "from TORCH_INDEX=$TORCH_INDEX"
  else
    wheel=
    for dir in $(pip_setting find-links); do
      for file in "${dir#file://}"/torch-"$TORCH_VERSION"+cpu-cp311-*linux*_x86_64.whl; do
        [ -f "$file" ] && wheel=$file
      done
    done
    if [ -n "$wheel" ]; then
      # A PEP 503 index of one project, mounted into the build at a fixed path: the build
      # argument, part of the layer cache key, is then the same on every run.
      mkdir -p "$work/torch-index/torch"
      ln "$wheel" "$work/torch-index/torch/" 2>/dev/null || cp "$wheel" "$work/torch-index/torch/"
      printf '<a href="%s">%s</a>\n' "${wheel##*/}" "${wheel##*/}" >"$work/torch-index/torch/index.html"
      build_args+=(--volume "$work/torch-index:/torch-index:ro"
        --build-arg "TORCH_INDEX=file:///torch-index/")
      echo "from the local wheel $wheel"
    else
      echo "from the Dockerfile's default TORCH_INDEX"
    fi
  fi

  # A machine whose traffic passes a TLS proxy has pip trust the proxy's CA (pip's `cert`
  # setting): the build's RUN steps see that bundle in place of the image's own, so Debian's
  # pip, which reads the system bundle, trusts it too. It is mounted, never left in a layer.
  cert=$(pip_setting cert)
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    build_args+=(--volume "$cert:/etc/ssl/certs/ca-certificates.crt:ro")
    echo "the build trusts pip's CA bundle $cert"
  fi

  say "build $image"
  # Docker format keeps the HEALTHCHECK, which the OCI format has no field for. Host network:
  # the build reaches the package index the way this machine does.
  started=$SECONDS
  podman build --format docker --network host "${runtime_opts[@]}" --target "$target" \
    "${build_args[@]}" -t "$image" .
  echo "built in $((SECONDS - started)) s"
  podman history --format '{{.Size}}\t{{.CreatedBy}}' "$image" | cut -c 1-150 | head -20
}
