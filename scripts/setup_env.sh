#!/usr/bin/env bash
# Creates (once) and prints the path of a virtual environment with torch, nnU-Net and this package
# installed in editable mode, every package at its version in scripts/constraints.txt. Cached outside
# the checkout, keyed by the requirements and constraints, so a second call takes seconds. Override the
# location with SAMSSL_VENV=/path.
#
# torch and torchvision must be a matching pair: nnU-Net's trainer lookup imports timm -> torchvision.
# torch 2.14.1 + torchvision 0.29.1 (CUDA builds, they also run on CPU) is such a pair.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
key="$(cat "$repo/scripts/requirements.txt" "$repo/scripts/constraints.txt" "$repo/scripts/setup_env.sh" | sha256sum | cut -c1-12)"
venv="${SAMSSL_VENV:-$HOME/.cache/nnunetv2-samssl/venv-$key}"
python="${PYTHON:-python3}"

quiet() {  # run a command, show its output only if it fails
    local log
    log="$(mktemp)"
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "FAILED: $*" >&2
        exit 1
    fi
    rm -f "$log"
}

if [ ! -f "$venv/.complete" ]; then
    echo "Creating the environment in $venv (once; a few minutes)..." >&2
    rm -rf "$venv"
    quiet "$python" -m venv "$venv"
    quiet "$venv/bin/python" -m pip install --upgrade pip
    quiet "$venv/bin/python" -m pip install -c "$repo/scripts/constraints.txt" torch==2.14.1 torchvision==0.29.1
    quiet "$venv/bin/python" -m pip install -r "$repo/scripts/requirements.txt" -c "$repo/scripts/constraints.txt"
    # real CT/MR samples with labels for the real-anatomy tests; only its data files are read
    quiet "$venv/bin/python" -m pip install --no-deps tptbox==1.1.0
    touch "$venv/.complete"
fi
# this checkout, editable (no dependency changes): cheap, and always the code at hand
quiet "$venv/bin/python" -m pip install --no-deps --no-build-isolation -e "$repo"
echo "$venv"
