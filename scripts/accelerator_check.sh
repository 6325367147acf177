#!/usr/bin/env bash
# Runs each experiment's default for a few hundred steps in bfloat16 on a GPU / TPU and prints
# examples/s, TFLOP/s per device, MFU, peak memory and whether the loss fell (on CPU: one line, exit 2).
#   scripts/accelerator_check.sh [--steps 300] [--workdir DIR] [--only clip,fusion]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m benchmarks.accelerator_check "$@"
