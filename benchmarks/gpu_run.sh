#!/usr/bin/env bash
# The prepared GPU run for one H100/H200 window (guarded to end within 540 s of its start: give the device call
# timeout_s 540):
#   1. FLUX.1-dev's attention alone on each SDPA backend, cuDNN layouts included, each case in its own process
#      (benchmarks/attention_probe.py; 2026-11-27 on an H200: about 90 s, at most 120): what attention costs per step,
#      and whether cuDNN runs;
#   2. where the probe found ddiff's cuDNN backend (ddiff_cudnn) running, agreeing with flash and faster: the 1024 px
#      goal pair on it, with its kernel table (OUT_DIR/full-ddiff-cudnn.json; on 2026-11-27 the goal's best: 0.376 s,
#      44.0% MFU on an H200);
#   3. the trainer's step at FLUX.1-dev's transformer shape on the default attention: eager vs --compile,
#      checkpointing off / every / every 2nd block, 1024 and 512 px (benchmarks/test_full_model.py), with MFU, and the
#      kernel table of the 1024 px goal pair, in what is left of 500 s (about 240 s for all eleven variants);
#   4. in the time left (at most 110 s), a 100-step run of scripts/train_lora.py --compile on the small random model:
#      its graph count.
#   bash benchmarks/gpu_run.sh OUT_DIR
# Carries diffusers (and what else the machine lacks) as wheels in .whl/. Results: OUT_DIR/attention.json,
# OUT_DIR/full-ddiff-cudnn.json (where run), OUT_DIR/full.json, OUT_DIR/RESULTS-*.md, OUT_DIR/compile-100-steps.json
# and OUT_DIR/compile-100-steps.log.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" "${1:-.benchmarks}"
timeout -k 10 120 python3 -m benchmarks.attention_probe --output "$out/attention.json" \
  || echo "the attention probe did not finish"
# Where the probe found ddiff's cuDNN backend running, agreeing with flash and faster: the goal pair on it.
if python3 -m benchmarks.attention_probe --worth-trying "$out/attention.json"; then
  run_bench full-ddiff-cudnn 120 benchmarks/test_full_model.py -m gpu --device cuda --dtype bf16 --model-size full \
    --attention-backend ddiff_cudnn -k "step[0] or step[1]" --benchmark-columns=median,min,max,rounds
fi
limit=$(( 500 - SECONDS )); (( limit > 280 )) && limit=280
run_bench full "$limit" benchmarks/test_full_model.py -m gpu --device cuda --dtype bf16 --model-size full \
  --benchmark-columns=median,min,max,rounds
# The call's limit is 540 s: what is left goes to the graph count (measured on 2026-11-27: 4 graphs), or is kept.
if (( SECONDS > 440 )); then echo "the 100-step --compile run is skipped: ${SECONDS} s used"; exit 0; fi
tmp=$(mktemp -d)
python3 -m ddiff_core.tiny --size small --output_dir "$tmp/model" >/dev/null
limit=$(( 515 - SECONDS - 15 )); (( limit > 110 )) && limit=110
if (( limit < 20 )); then echo "the 100-step --compile run is skipped: ${SECONDS} s used"; exit 0; fi
# Its log comes back too: stopped by the SIGINT, the run still logs how many graphs it compiled.
timeout -s INT -k 15 "$limit" python3 scripts/train_lora.py --pretrained_model_name_or_path "$tmp/model" \
  --instance_data_dir data/demo --output_dir "$tmp/run" --resolution 256 --train_batch_size 2 --max_train_steps 100 \
  --cache_latents --mixed_precision bf16 --compile --seed 0 --report_to none --checkpointing_steps 1000 \
  2>&1 | tail -c 200000 > "$out/compile-100-steps.log" \
  && cp "$tmp/run/run_summary.json" "$out/compile-100-steps.json" && cat "$out/compile-100-steps.json" \
  || { echo "the 100-step --compile run did not finish"; tail -n 20 "$out/compile-100-steps.log"; }
exit 0
