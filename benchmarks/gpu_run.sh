#!/usr/bin/env bash
# The one prepared GPU run (device machine): full FLUX shape, then the small-model fixes on CUDA.
#   bash benchmarks/gpu_run.sh OUT_DIR
# Carries diffusers as a wheel in .whl/ when the machine lacks it. Results: OUT_DIR/full.json, OUT_DIR/small-cuda.json.
set -uo pipefail
out="${1:-.benchmarks}"; mkdir -p "$out"
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 300 python3 -m pytest benchmarks/test_full_model.py -p no:cacheprovider -m gpu -q -rs --device cuda --dtype bf16 \
  --model-size full --benchmark-json "$out/full.json" --benchmark-columns=median,min,max,rounds
timeout 200 python3 -m pytest benchmarks/test_fixes.py -p no:cacheprovider -q -x --device cuda --dtype fp32 --model-size small \
  -k "not ddp_no_sync" --benchmark-json "$out/small-cuda.json" --benchmark-columns=median,rounds
exit 0
