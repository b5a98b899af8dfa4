# tlserve — two commands on a fresh machine:  `make run`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MANIFEST := model_store/manifest.json
# `make run HOST=0.0.0.0 PORT=9000` binds elsewhere; unset, TLSERVE_HOST / TLSERVE_PORT (default 127.0.0.1:8000) decide.
HOST ?=
PORT ?=
IMAGE ?= localhost/tlserve:cpu

.PHONY: run test setup export lint fmt docs bench bench-quick clean image test-container lock

$(STAMP): pyproject.toml setup.py app/grpc/predict_v2.proto
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,ray,docs]'
	touch $(STAMP)

setup: $(STAMP)

$(MANIFEST): | $(STAMP)
	$(BIN)/tlserve export

export: $(STAMP)
	$(BIN)/tlserve export

# With no TLSERVE_ADMIN_KEYS set, the server makes an admin key for this run and prints it (train, promote,
# roll back and delete need it; the console asks for it). Inference needs no key unless TLSERVE_API_KEYS is set.
run: $(STAMP) $(MANIFEST)
	$(BIN)/tlserve serve --generate-admin-key $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

test: $(STAMP) $(MANIFEST)
	$(BIN)/ruff check app client tests benchmarks deploy docs
	$(BIN)/ruff format --check app client tests benchmarks deploy docs
	$(BIN)/mypy
	$(MAKE) -s docs
	$(BIN)/python -m pytest -q

# The docs site, strict (warnings are errors) and offline; the generated reference fragments must be current
# (`python -m docs.gen` rewrites them). Open docs/_build/html/index.html.
docs: $(STAMP)
	$(BIN)/python -m docs.gen --check
	$(BIN)/sphinx-build -W --keep-going -n -q docs docs/_build/html

# The container image with podman and no Docker Hub (.ci/container: debootstrap base, `podman build
# --format docker`); `make test` runs its tests too whenever podman is installed.
image:
	.ci/container build -t $(IMAGE)

test-container: $(STAMP) $(MANIFEST)
	$(BIN)/python -m pytest -q tests/test_container.py

# Re-pin the image's dependencies after changing pyproject.toml's (tests fail while the locks are stale).
lock: $(STAMP)
	$(BIN)/python deploy/requirements/lock.py

lint: $(STAMP)
	$(BIN)/ruff check app client tests benchmarks deploy
	$(BIN)/mypy
	$(BIN)/ruff format --check app client tests benchmarks deploy

fmt: $(STAMP)
	$(BIN)/ruff format app client tests benchmarks deploy
	$(BIN)/ruff check --fix app client tests benchmarks deploy

bench: $(STAMP) $(MANIFEST)
	$(BIN)/python -m benchmarks.bench

bench-quick: $(STAMP) $(MANIFEST)
	$(BIN)/python -m benchmarks.bench --quick

clean:
	rm -rf $(VENV) model_store/*.onnx $(MANIFEST) model_store/.cache benchmarks/out
