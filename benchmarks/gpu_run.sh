#!/usr/bin/env bash
# The prepared GPU run for one H100/H200 window (guarded to end within 540 s of its start: give the device call
# timeout_s 540):
#   1. FLUX.1-dev's attention alone on each SDPA backend, cuDNN layouts included, each case in its own process, flash
#      and ddiff's cuDNN layout first (benchmarks/attention_probe.py; about 90 s on an H200, at most 160): what
#      attention costs per step, and whether cuDNN runs;
#   2. where the probe found ddiff's cuDNN backend (ddiff_cudnn) running, agreeing with flash and faster: the 1024 px
#      goal pair on it, eager and compiled, with their kernel tables (at most 170 s; on 2026-11-27, 0.376 s a step
#      compiled on an H200, 44.0% MFU);
#   3. the trainer's step at FLUX.1-dev's transformer shape on the default attention: eager vs --compile,
#      checkpointing off / every / every 2nd block, 1024 and 512 px (benchmarks/test_full_model.py), with MFU and the
#      kernel table of the 1024 px goal pair, in what is left of 500 s (at most 280; all eleven variants took 234 s).
#   bash benchmarks/gpu_run.sh OUT_DIR
# The 100-step graph counts run in benchmarks/gpu_memory.sh, the window's second call.
# Carries diffusers (and what else the machine lacks) as wheels in .whl/. Results: OUT_DIR/attention.json,
# OUT_DIR/full-ddiff-cudnn.json (where run), OUT_DIR/full.json and OUT_DIR/RESULTS-*.md.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" "${1:-.benchmarks}"
rm -f "$out/attention.json"  # an earlier probe's answer must not pass for this one's
timeout -k 10 150 python3 -m benchmarks.attention_probe --output "$out/attention.json" \
  || echo "the attention probe did not finish"
if python3 -m benchmarks.attention_probe --worth-trying "$out/attention.json"; then
  run_bench full-ddiff-cudnn 150 benchmarks/test_full_model.py -m gpu --device cuda --dtype bf16 --model-size full \
    --attention-backend ddiff_cudnn -k "step[0] or step[1]" --benchmark-columns=median,min,max,rounds
fi
limit=$(( 500 - SECONDS )); (( limit > 280 )) && limit=280
if (( limit < 30 )); then echo "the default-attention variants are skipped: ${SECONDS} s used"; exit 0; fi
run_bench full "$limit" benchmarks/test_full_model.py -m gpu --device cuda --dtype bf16 --model-size full \
  --benchmark-columns=median,min,max,rounds
exit 0
