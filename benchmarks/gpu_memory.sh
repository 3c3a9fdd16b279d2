#!/usr/bin/env bash
# The window's second call (under 5 minutes on the warm machine, after benchmarks/gpu_run.sh; give it timeout_s 300):
#   1. the trainer's step at FLUX.1-dev's shape, 1024 px, batch 1, checkpointing on, with the frozen base in bf16,
#      int8, fp8 and NF4 (AdamW), and NF4 with 8-bit Adam (benchmarks/test_memory.py; about 60 s on an H200);
#   2. in the time left, 100 steps of scripts/train_lora.py --compile on the small random model, on ddiff_cudnn and
#      then on the default attention: how many graphs a run compiles, and that ddiff_cudnn lasts a run.
#   bash benchmarks/gpu_memory.sh OUT_DIR
# The GPU machine reaches no package registry: diffusers, torchao and bitsandbytes travel as wheels in .whl/
# (see benchmarks/NOTES.md). Results: OUT_DIR/memory.json, OUT_DIR/RESULTS-memory.md, and
# OUT_DIR/compile-100-steps[-ddiff-cudnn].{json,log}.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" "${1:-.benchmarks}"
run_bench memory 200 benchmarks/test_memory.py -m "not slow" --device cuda --dtype bf16 --model-size full \
  --benchmark-columns=median,rounds

graph_count() {  # NAME [train_lora.py flags...]: a 100-step run in what is left of 285 s, at most 110
  local name=$1; shift
  rm -f "$out/$name.json" "$out/$name.log"  # an earlier run's files must not pass for this run's
  local limit=$(( 285 - SECONDS )); (( limit > 110 )) && limit=110
  # A run takes 50-60 s on an H200 (a 35 s first step compiles): one cut off inside it says nothing.
  if (( limit < 75 )) || [[ ! -d "$tmp/model" ]]; then echo "$name is skipped: ${SECONDS} s used"; return; fi
  # Its log comes back too: stopped by the SIGINT, the run still logs how many graphs it compiled.
  timeout -s INT -k 10 "$limit" python3 scripts/train_lora.py --pretrained_model_name_or_path "$tmp/model" \
    --instance_data_dir data/demo --output_dir "$tmp/$name" --resolution 256 --train_batch_size 2 \
    --max_train_steps 100 --cache_latents --mixed_precision bf16 --compile --seed 0 --report_to none \
    --checkpointing_steps 1000 "$@" 2>&1 | tail -c 200000 > "$out/$name.log"
  if [[ -f "$tmp/$name/run_summary.json" ]]; then
    cp "$tmp/$name/run_summary.json" "$out/$name.json" && cat "$out/$name.json"
  else
    echo "$name did not finish"; tail -n 20 "$out/$name.log"
  fi
}
tmp=$(mktemp -d)
(( SECONDS < 210 )) && python3 -m ddiff_core.tiny --size small --output_dir "$tmp/model" >/dev/null
graph_count compile-100-steps-ddiff-cudnn --attention_backend ddiff_cudnn
graph_count compile-100-steps
exit 0
