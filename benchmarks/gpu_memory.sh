#!/usr/bin/env bash
# The prepared GPU memory run (under 5 minutes after the machine's start; with benchmarks/gpu_run.sh it fits one
# 15-minute window): the trainer's step at FLUX.1-dev's shape, 1024 px, batch 1, checkpointing on, with the frozen
# base in bf16, int8, fp8 and NF4 (AdamW), and NF4 with 8-bit Adam (benchmarks/test_memory.py).
#   bash benchmarks/gpu_memory.sh OUT_DIR
# The GPU machine reaches no package registry: diffusers, torchao and bitsandbytes travel as wheels in .whl/
# (see benchmarks/NOTES.md). Results: OUT_DIR/memory.json and OUT_DIR/RESULTS-memory.md.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" "${1:-.benchmarks}"
run_bench memory 220 benchmarks/test_memory.py -m "not slow" --device cuda --dtype bf16 --model-size full \
  --benchmark-columns=median,rounds
exit 0
