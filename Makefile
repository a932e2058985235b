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
# Turbo at r = 8, 12, 16: accuracy / FLOPs table and the accuracy-FLOPs plots in demo-results/.
# It runs the rewritten graphs eagerly, so it says nothing about speed: that is `make bench`.
DEMO_ARGS ?= --suite demo --train 1000 --test 500
demo: env
	$(VENV)/bin/turbo-fx eval $(DEMO_ARGS) --out demo-results

# Speed: DeiT-S and ViT-B (random weights) compiled by Inductor and by turbo at r = 0, 8, 13 on
# this CPU, into bench/results/bench_vit.*; about 8 minutes on 2 cores. A private Inductor cache,
# so that it never reads or fills the user's cache in /tmp (compile times are measured there).
BENCH_ARGS ?= --model timm:deit_small_patch16_224 timm:vit_base_patch16_224 --rounds 7 --compile-repeats 2
bench: env
	mkdir -p $(BUILD_DIR)/torchinductor
	TORCHINDUCTOR_CACHE_DIR="$(CURDIR)/$(BUILD_DIR)/torchinductor" $(VENV)/bin/turbo-fx bench $(BENCH_ARGS) \
		--name bench_vit --out bench/results

# The committed fidelity results (bench/results/eval_*): about 1 hour on 2 cores.
eval-bench: env
	$(VENV)/bin/turbo-fx eval --task fashion-mnist --suite full --train 3000 --test 2000 --out bench/results \
		--methods redundancy-only semantic-only turbo 'turbo + keep_salient' --no-progress
	$(VENV)/bin/turbo-fx eval --task text --suite full --out bench/results --no-progress --threads 1

clean:
	rm -rf $(VENV)
