# One entry point for a fresh machine: `make demo` (end to end) and `make test` (the whole suite).
# `make test-fast`: the unit tests only (no Ray cluster, S3 server or DeepSpeed engine), for quick checks.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install test test-fast demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so that nothing later pulls a CUDA build (the CPU wheel lies on local disk)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q tests

test-fast: install
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m "not integration and not slow" tests

demo: install
	DS_ACCELERATOR=cpu $(BIN)/python -m ray_jobs.demo $(if $(DEMO_FAST),--fast true,) $(if $(DEMO_OUT),--out $(DEMO_OUT),)

lint: install
	$(BIN)/ruff check olmoearth pipelines serve ray_jobs tests bench

bench: install
	for f in bench/*.py; do DS_ACCELERATOR=cpu $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .cache
