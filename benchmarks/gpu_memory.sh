#!/usr/bin/env bash
# The prepared GPU memory run (under 5 minutes after the machine's start; with benchmarks/gpu_run.sh it fits one
# 15-minute window): the trainer's step at FLUX.1-dev's shape, 1024 px, batch 1, checkpointing on, with the frozen
# base in bf16, int8, fp8 and NF4 (AdamW), and NF4 with 8-bit Adam (benchmarks/test_memory.py).
#   bash benchmarks/gpu_memory.sh OUT_DIR
# The GPU machine reaches no package registry: diffusers, torchao and bitsandbytes travel as wheels in .whl/
# (see benchmarks/NOTES.md). Results: OUT_DIR/memory.json and OUT_DIR/RESULTS-memory.md.
set -uo pipefail
out="${1:-.benchmarks}"; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
valid() { python3 -c "import json, sys; json.load(open(sys.argv[1]))" "$1" 2>/dev/null; }
rm -f "$out/memory.json" "$out/memory.json.partial"  # an earlier run's files must not pass for this run's
timeout -s INT -k 20 220 python3 -m pytest benchmarks/test_memory.py -p no:cacheprovider -m "not slow" -q -rs --device cuda \
  --dtype bf16 --model-size full --benchmark-json "$out/memory.json" --benchmark-columns=median,rounds
valid "$out/memory.json" || mv -f "$out/memory.json.partial" "$out/memory.json" 2>/dev/null
valid "$out/memory.json" && python3 -m benchmarks.report "$out/memory.json" --output "$out/RESULTS-memory.md" --notes /dev/null
exit 0
