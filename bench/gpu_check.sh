#!/usr/bin/env bash
# One GPU check (issue #28 item 5): on a GPU machine, after `make venv`,
#     bash bench/gpu_check.sh [--out DIR]
# make-demo-data + embed of the real-size HIPT-4K (random weights, bf16 + torch.compile) and the
# figures that say whether the GPU is fed (bench/gpu_check.py's docstring lists them); under
# 8 minutes on an H100. `--cpu` runs the same steps small on a CPU (the test of the script).
# Without Ray it adds --no-ray itself. Results: printed, and gpu_check.json under --out (default $OUT). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 RAY_DATA_DISABLE_PROGRESS_BARS=1
# No Ray here (the device machines' image: bench/gpu_wheels.sh says what to carry): the same
# check without the embed job.
args=("$@")
if [[ " ${args[*]} " != *" --no-ray "* ]] && ! "$PYTHON" -c "import ray" 2>/dev/null; then
    echo "gpu_check: ray is not importable by $PYTHON: running with --no-ray (no end-to-end figures)" >&2
    args+=(--no-ray)
fi
exec "$PYTHON" bench/gpu_check.py "${args[@]}"
