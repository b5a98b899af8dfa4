# tlserve — two commands on a fresh machine:  `make run`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MANIFEST := model_store/manifest.json
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test setup export lint fmt bench bench-quick clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $(STAMP)

setup: $(STAMP)

$(MANIFEST): | $(STAMP)
	$(BIN)/tlserve export

export: $(STAMP)
	$(BIN)/tlserve export

run: $(STAMP) $(MANIFEST)
	$(BIN)/tlserve serve --host $(HOST) --port $(PORT)

test: $(STAMP) $(MANIFEST)
	$(BIN)/ruff check app client tests benchmarks deploy
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check app client tests benchmarks deploy
	$(BIN)/ruff format --check app client tests benchmarks deploy

fmt: $(STAMP)
	$(BIN)/ruff format app client tests benchmarks deploy
	$(BIN)/ruff check --fix app client tests benchmarks deploy

bench: $(STAMP) $(MANIFEST)
	$(BIN)/tlserve bench

bench-quick: $(STAMP) $(MANIFEST)
	$(BIN)/tlserve bench --quick

clean:
	rm -rf $(VENV) model_store/*.onnx $(MANIFEST) model_store/.cache benchmarks/out
