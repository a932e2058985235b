#!/usr/bin/env bash
# Run turbo's core, op and pass tests under each torch version the project declares, each in
# a throwaway virtual environment: pyproject.toml says torch >= 2.11 and constraints.txt pins
# 2.13.0, which is all that CI installs. This script is how the lower end of the range is
# checked (slow: a CUDA build of torch and its CUDA libraries, some 3 GB, per version).
#
# usage: scripts/check_torch_versions.sh [TORCH_VERSION...]     (default: 2.11.0 2.13.0)
#
# Environment knobs:
#   PYTHON        interpreter the venvs are made from (default: python3)
#   WORK          folder for the venvs (default: a fresh temporary folder, removed at exit
#                 unless KEEP=1)
#   KEEP=1        keep the venvs (a second run with the same WORK reuses them)
#   INSTALL_ONLY=1  install each version and import it, but run no test
#   TESTS         test folders (default: tests/core tests/ops tests/passes)
#   PYTEST_ARGS   extra pytest arguments (default: -q)
#
# Companion pins: torch 2.11 gets timm 1.0.29 and transformers 5.17.0 (the versions of common
# GPU images with that torch); any other version the pins of constraints.txt. torchvision is
# the release paired with each torch (0.(minor + 15).0). torchao stays out: its builds follow
# torch closely, and its tests skip without it. Only PyPI is needed; torch there is the CUDA
# build, which runs on machines without a GPU.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
TESTS="${TESTS:-tests/core tests/ops tests/passes}"
PYTEST_ARGS="${PYTEST_ARGS:--q}"
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(2.11.0 2.13.0)

if [ -z "${WORK:-}" ]; then
    WORK="$(mktemp -d -t turbo-torch-versions.XXXXXX)"
    [ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"

die() {
    echo "check_torch_versions: ERROR: $*" >&2
    exit 1
}

torchvision_for() {
    local minor
    minor="$(echo "$1" | cut -d. -f2)"
    echo "0.$((minor + 15)).0"
}

# The pins of constraints.txt less those this script chooses per torch version.
shared_constraints() {
    grep -v -E '^(torch|torchvision|timm|transformers|torchao)(=|$)' constraints.txt
}

companion_pins() {
    local version="$1"
    # ===: exact string equality, so that a local build (2.13.0+cpu) is not taken for it.
    echo "torch===$version"
    echo "torchvision==$(torchvision_for "$version")"
    case "$version" in
        2.11.*) printf 'timm==1.0.29\ntransformers==5.17.0\n' ;;
        *) grep -E '^(timm|transformers)==' constraints.txt ;;
    esac
}

install_version() {
    local version="$1" venv="$2" pins="$2/pins.txt"
    [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
    { shared_constraints; companion_pins "$version"; } > "$pins"
    "$venv/bin/python" -m pip install --quiet -c "$pins" \
        "torch===$version" "torchvision==$(torchvision_for "$version")" timm transformers diffusers \
        pytest hypothesis
    "$venv/bin/python" -m pip install --quiet -c "$pins" -e "$ROOT"
    "$venv/bin/python" -c 'import sys, torch, timm, transformers, turbo_fx
print(f"torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}",
      file=sys.stderr)'
}

run_tests() {
    local venv="$1"
    # shellcheck disable=SC2086 # TESTS and PYTEST_ARGS are word lists
    "$venv/bin/python" -m pytest $PYTEST_ARGS -p no:cacheprovider $TESTS
}

failed=()
for version in "${VERSIONS[@]}"; do
    venv="$WORK/torch-$version"
    echo "== torch $version ($venv)"
    if ! install_version "$version" "$venv"; then
        failed+=("$version (install)")
        continue
    fi
    [ "${INSTALL_ONLY:-0}" = 1 ] && continue
    run_tests "$venv" || failed+=("$version (tests)")
done

if [ ${#failed[@]} -gt 0 ]; then
    die "failed: ${failed[*]}"
fi
echo "check_torch_versions: all passed: ${VERSIONS[*]}"
