#!/usr/bin/env bash
# The GPU checks, for a machine with a GPU (torch 2.11 preinstalled, no network). Device time
# is short (15 minutes in all, machine start included), so `all` is the one call to make
# (~8 min: every step has its own time limit); results go under $OUT.
#
#   here:       .venv/bin/pip wheel --no-deps -w dist .       (dist/ is ignored: carry it)
#   on the GPU: bash scripts/gpu_check.sh all                 (ViT-B and DeiT-S r=13 in the default
#                                                              mode and reduce-overhead, tests/cuda,
#                                                              ViT-L r=8 in reduce-overhead; bf16)
#               bash scripts/gpu_check.sh tests               (tests/cuda alone, ~2-4 min)
#               bash scripts/gpu_check.sh bench               (three merge paths per model, ~8 min)
#
# The studies run through the command line (`turbo-fx merge-paths`), as `python3 -m
# turbo_fx.bench.cli`: a wheel installed with --target has no console script on the PATH.
#
# Nothing here runs in CI: CI machines have no GPU, and tests/cuda skips itself there.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
part="${1:?usage: gpu_check.sh all|tests|bench}"
OUT="${OUT:-build/gpu_check}"
mkdir -p "$OUT"

if ! python3 -c "import turbo_fx" 2>/dev/null; then
    wheel=$(ls dist/turbo_fx-*.whl 2>/dev/null | head -1)
    [ -n "$wheel" ] || { echo "gpu_check: no dist/turbo_fx-*.whl; build it first (see the header)" >&2; exit 2; }
    python3 -m pip install -q --no-deps --no-index --target /tmp/turbo-site "$wheel" || exit 2
    export PYTHONPATH=/tmp/turbo-site
fi
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"

case "$part" in
all)
    # In order of what the issue needs most; every step writes under $OUT as it ends, so a
    # device call cut off at its limit still brings back the steps before.
    export TORCHINDUCTOR_CACHE_DIR=/tmp/turbo-inductor
    paths() {  # model r batch mode seconds: Inductor against the default path, both in that mode
        timeout "$5" python3 -m turbo_fx.bench.cli merge-paths --model "timm:$1" --r "$2" --batch "$3" --device cuda \
            --dtype bf16 --threads 4 --rounds 20 --mode "$4" --paths "compiled merge pieces" --out "$OUT" 2>&1 | tail -5
    }
    paths vit_base_patch16_224 13 256 default 80
    paths vit_base_patch16_224 13 256 reduce-overhead 80
    paths deit_small_patch16_224 13 256 default 70
    paths deit_small_patch16_224 13 256 reduce-overhead 70
    timeout 170 python3 -m pytest -q -p no:cacheprovider tests/cuda -rs 2>&1 | tail -40 | tee "$OUT/cuda_tests.txt"
    paths vit_large_patch16_224 8 128 reduce-overhead 90
    ;;
tests)
    python3 -m pytest -q -p no:cacheprovider tests/cuda -rs 2>&1 | tail -40 | tee "$OUT/cuda_tests.txt"
    ;;
bench)
    export TORCHINDUCTOR_CACHE_DIR=/tmp/turbo-inductor
    # model r batch: the issue's targets (ViT-B r=13 >= 1.55x, DeiT-S r=13 >= 1.45x, ViT-L r=8 >= 1.8x).
    # "compiled merge pieces" is the default; compile_blocks=True pins the eager merge op.
    for spec in "vit_base_patch16_224 13 256" "deit_small_patch16_224 13 256" "vit_large_patch16_224 8 128"; do
        set -- $spec
        timeout 170 python3 -m turbo_fx.bench.cli merge-paths --model "timm:$1" --r "$2" --batch "$3" --device cuda \
            --dtype bf16 --threads 4 --rounds 20 --paths fuse_merges=True compile_blocks=True "compiled merge pieces" \
            --out "$OUT" 2>&1 | tail -9
    done
    ;;
*)
    echo "gpu_check: unknown part '$part' (all, tests or bench)" >&2
    exit 2
    ;;
esac
