#!/usr/bin/env bash
# The prepared GPU run for one H100/H200 window (at most about 8 minutes after the machine's start: give the device
# call timeout_s 540):
#   1. the trainer's step at FLUX.1-dev's transformer shape: eager vs --compile, checkpointing off / every / every 2nd
#      block, 1024 and 512 px (benchmarks/test_full_model.py), with MFU, and the kernel table of the 1024 px goal pair;
#   2. a 100-step run of scripts/train_lora.py --compile on the small random model: its graph count (run_summary.json).
#   bash benchmarks/gpu_run.sh OUT_DIR
# Carries diffusers (and what else the machine lacks) as wheels in .whl/. Results: OUT_DIR/full.json,
# OUT_DIR/RESULTS-gpu.md, OUT_DIR/compile-100-steps.json and OUT_DIR/compile-100-steps.log.
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
rm -f "$out/full.json" "$out/full.json.partial"  # an earlier run's files must not pass for this run's
# SIGINT first: pytest then ends the session and writes the JSON of every variant measured so far. A SIGINT heard
# too late (inside a compile) runs on to the SIGKILL; then the .partial JSON, rewritten after each variant, stands in.
timeout -s INT -k 20 280 python3 -m pytest benchmarks/test_full_model.py -p no:cacheprovider -m gpu -q -rs --device cuda \
  --dtype bf16 --model-size full --benchmark-json "$out/full.json" --benchmark-columns=median,min,max,rounds
valid "$out/full.json" || mv -f "$out/full.json.partial" "$out/full.json" 2>/dev/null
valid "$out/full.json" && python3 -m benchmarks.report "$out/full.json" --output "$out/RESULTS-gpu.md" --notes /dev/null
tmp=$(mktemp -d)
python3 -m ddiff_core.tiny --size small --output_dir "$tmp/model" >/dev/null
# Its log comes back too: stopped by the SIGINT, the run still logs how many graphs it compiled.
timeout -s INT -k 15 120 python3 scripts/train_lora.py --pretrained_model_name_or_path "$tmp/model" \
  --instance_data_dir data/demo --output_dir "$tmp/run" --resolution 256 --train_batch_size 2 --max_train_steps 100 \
  --cache_latents --mixed_precision bf16 --compile --seed 0 --report_to none --checkpointing_steps 1000 \
  2>&1 | tail -c 200000 > "$out/compile-100-steps.log" \
  && cp "$tmp/run/run_summary.json" "$out/compile-100-steps.json" && cat "$out/compile-100-steps.json" \
  || { echo "the 100-step --compile run did not finish"; tail -n 20 "$out/compile-100-steps.log"; }
exit 0
