# `make demo` and `make test` do all set-up on a fresh Debian machine (Python 3.11, root):
# Debian packages, a virtualenv in .venv with the package and its extras, then the job itself.
# Each step is skipped when its result is already there.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TIMM_TESTS := $(VENV)/timm-tests
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get
PYTEST_ARGS ?=

.PHONY: install demo test lint bench models clean dist

install: $(STAMP) $(FMNIST) $(TIMM_TESTS)/tests/test_models.py

$(FMNIST):
	$(APT) update -qq
	$(APT) install -y -qq dataset-fashion-mnist

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import ensurepip, venv" 2>/dev/null || { $(APT) update -qq && $(APT) install -y -qq python3-venv python3-pip; }
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,cam,onnx,seg,cluster]'
	touch $@

# timm's own model tests, from the sdist of the installed timm (tests/test_timm_models.py runs them on our models).
$(TIMM_TESTS)/tests/test_models.py: $(STAMP)
	rm -rf $(TIMM_TESTS) && mkdir -p $(TIMM_TESTS)
	v=$$($(BIN)/python -c 'import timm; print(timm.__version__)') && \
	$(BIN)/python -m pip download -q --no-binary :all: --no-deps -d $(TIMM_TESTS) "timm==$$v" && \
	tar -xzf $(TIMM_TESTS)/timm-$$v.tar.gz -C $(TIMM_TESTS) --strip-components=1 \
		timm-$$v/tests timm-$$v/pyproject.toml timm-$$v/PKG-INFO && \
	rm $(TIMM_TESTS)/timm-$$v.tar.gz
	touch $@

demo: install
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=2 -m openaff train --recipe fashion-mnist-cpu --output runs/demo --overwrite

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# ruff, and the direction of imports (pyproject.toml [tool.importlinter], docs/architecture.md).
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

models: install
	$(BIN)/openaff models

bench: install
	$(BIN)/openaff bench --device cpu --mode infer --batch 8 --threads 2 --json benchmarks/results/cpu-infer.json

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info

# The wheel and the sdist, each installed into a fresh venv (dependencies from the registry) and smoke-tested.
DIST_VENV ?= /tmp/openaff-dist-venv
dist: install
	rm -rf dist && $(BIN)/python -m build --outdir dist .
	rm -rf $(DIST_VENV) && $(PYTHON) -m venv $(DIST_VENV)
	$(DIST_VENV)/bin/python -m pip install -q dist/*.whl
	cd /tmp && $(DIST_VENV)/bin/python $(CURDIR)/.ci/smoke.py
	$(DIST_VENV)/bin/python -m pip install -q --force-reinstall --no-deps dist/*.tar.gz
	cd /tmp && $(DIST_VENV)/bin/python $(CURDIR)/.ci/smoke.py
