#!/usr/bin/env bash
# The first thing to run on a machine with a GPU: device tests on CUDA, the demo config trained in
# bf16 and amp_bf16, figures to benchmarks/gpu_check.json (see benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh              # on a GPU machine, under 8 minutes
#   benchmarks/gpu_check.sh --cpu        # dry mode without a GPU (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" benchmarks/gpu_check.py "$@"
