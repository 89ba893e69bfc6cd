#!/usr/bin/env bash
# The test-suite: builds/reuses the environment (scripts/setup_env.sh), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not slow"`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$repo/scripts/setup_env.sh")"
cd "$repo"
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}"
"$venv/bin/python" -m pytest -q -ra --durations=15 "$@"
