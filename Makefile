# Two entry points for a fresh machine: `make serve` and `make test`. Both create the virtual
# environment and install the project into it first (once; again when pyproject.toml or the
# lock changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# torch stays out of the lock: its build (CPU, CUDA 12.x, ...) is chosen per machine and per
# image, while its own dependencies are locked. The Dockerfile's TORCH_VERSION is the same
# release (tests/test_lock.py checks). For another build of it, e.g.
#   make install TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126'
TORCH_VERSION := 2.13.0
TORCH ?= torch==$(TORCH_VERSION)

# The lock (docs/development.md, "Dependencies"): requirements/serve.txt is what
# `pip install .` needs with SERVE_EXTRAS, for the images; requirements/dev.txt adds DEV_EXTRAS, for
# `make install`. Both are for CPython 3.11 on x86-64 Linux, the Python of CI and of the images.
SERVE_LOCK := requirements/serve.txt
DEV_LOCK := requirements/dev.txt
# Extras in the serving set, so in the images: bioimageio, for model repositories that hold
# BioImage Model Zoo packages (docs/models.md).
SERVE_EXTRAS := bioimageio
# Extras that `make install` adds to the serving set. A name pyproject.toml does not define
# (yet) is skipped, so adding an extra there and here is all it takes.
DEV_EXTRAS := test train bioimageio
UV_VERSION := 0.13.9
# Where `make lock` reads the CPU torch wheel's dependencies from: pip's own find-links when
# this machine has them set (where `make install` finds torch), else PyTorch's CPU index.
pip_find_links = $(shell $(PYTHON) -m pip config list 2>/dev/null \
	| sed -n "s/^[^=]*\.find-links='\(.*\)'$$/\1/p" | head -1)
TORCH_FIND_LINKS ?= $(or $(pip_find_links),https://download.pytorch.org/whl/cpu/torch/)
# Extra `uv pip compile` flags: --upgrade (everything) or --upgrade-package NAME; without them
# `make lock` keeps every pin it can and only resolves what pyproject.toml changed.
LOCK_FLAGS ?=

defined_extras = $(shell $(PYTHON) -c 'import sys, tomllib; \
	extras = tomllib.load(open("pyproject.toml", "rb"))["project"].get("optional-dependencies", {}); \
	print(*(e for e in sys.argv[1:] if e in extras))' $(1))

.PHONY: install serve test lint format lock image-check compose-check

# The locked tree first, every file checked against its hash. It holds torch's own dependencies
# too, so installing torch next adds torch alone (and, for a CUDA build, its CUDA libraries);
# the project itself then adds nothing, and `pip check` proves that nothing is missing.
$(VENV)/.installed: pyproject.toml $(DEV_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check \
		|| { echo "pip check failed: if pyproject.toml changed, run make lock"; exit 1; }
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/unet-serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Regenerates both lock files from pyproject.toml. It needs only Python and the package index,
# not a working install, so it also runs when pyproject.toml has moved ahead of the lock. The
# dev lock is resolved first and constrains the serving one: a package has one version in both.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-constraint.txt
	$(BIN)/uv pip compile pyproject.toml --quiet --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--constraint $(VENV)/torch-constraint.txt $(addprefix --find-links ,$(TORCH_FIND_LINKS)) \
		--no-emit-package torch --custom-compile-command "make lock" $(LOCK_FLAGS) \
		$(foreach extra,$(call defined_extras,$(DEV_EXTRAS)),--extra $(extra)) --output-file $(DEV_LOCK)
	$(BIN)/uv pip compile pyproject.toml --quiet --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--constraint $(VENV)/torch-constraint.txt $(addprefix --find-links ,$(TORCH_FIND_LINKS)) \
		--no-emit-package torch --custom-compile-command "make lock" \
		$(foreach extra,$(call defined_extras,$(SERVE_EXTRAS)),--extra $(extra)) \
		--constraint $(DEV_LOCK) --output-file $(SERVE_LOCK)

# Builds the CPU image with podman, runs it and checks it end to end (deploy/image-check).
# Slow and disk-hungry, so not part of CI: run it before merging a change to the Dockerfile,
# docker-compose.yml or the dependencies.
image-check: install
	deploy/image-check

# Runs docker-compose.yml with podman and podman-compose: the CPU service and Prometheus up
# and healthy, a request through the published port, jobs across down + up, a clean down,
# and plain `up` on a machine without a GPU (deploy/compose-check). Slow; not part of CI.
compose-check: install
	deploy/compose-check
