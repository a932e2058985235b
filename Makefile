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

.PHONY: env test demo bench eval-bench clean

env:
	PYTHON="$(PYTHON)" bash scripts/bootstrap.sh

# Two pytest-xdist workers (the CI machines have 2 cores), whole files per worker (module
# fixtures stay shared); TEST_WORKERS=0 runs the suite in this process, in file order.
TEST_WORKERS ?= 2
test: env
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests $(PYTEST_ARGS)

# The main job: DINOv2-S (real weights) on a Fashion-MNIST sample, baseline vs redundancy-only vs
# Turbo at r = 8, 12, 16: accuracy / FLOPs / time table and the accuracy-speed plot in demo-results/.
DEMO_ARGS ?= --suite demo --train 1000 --test 500
demo: env
	$(VENV)/bin/turbo-fx eval $(DEMO_ARGS) --out demo-results

# A private Inductor cache for the benchmarks, so that they never read or fill the user's
# cache in /tmp (compile times are measured there).
bench: env
	mkdir -p $(BUILD_DIR)/torchinductor
	TORCHINDUCTOR_CACHE_DIR="$(CURDIR)/$(BUILD_DIR)/torchinductor" $(PY) -m turbo_fx.bench.bench_vit

# The committed fidelity results (bench/results/eval_*): about 1 hour on 2 cores.
eval-bench: env
	$(VENV)/bin/turbo-fx eval --task fashion-mnist --suite full --train 3000 --test 2000 --out bench/results --no-progress
	$(VENV)/bin/turbo-fx eval --task text --suite full --out bench/results --no-progress

clean:
	rm -rf $(VENV)
