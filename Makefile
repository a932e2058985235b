# turbo-fx: `make demo` (the main job), `make test` (the tests), `make bench`.
# Every target that runs Python first runs `make env`, which creates .venv and installs the
# project (a no-op, a few seconds, once the stamp in .venv matches pyproject.toml + constraints.txt).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The build dir is ignored by git (.gitignore: build/).
BUILD_DIR := build

.PHONY: env test demo bench clean

env:
	PYTHON="$(PYTHON)" bash scripts/bootstrap.sh

test: env
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: env
	$(PY) bench/demo.py

# A private Inductor cache for the benchmarks, so that they never read or fill the user's
# cache in /tmp (compile times are measured there).
bench: env
	mkdir -p $(BUILD_DIR)/torchinductor
	TORCHINDUCTOR_CACHE_DIR="$(CURDIR)/$(BUILD_DIR)/torchinductor" $(PY) bench/bench_vit.py

clean:
	rm -rf $(VENV)
