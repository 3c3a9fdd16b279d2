# Sourced by benchmarks/gpu_run.sh and gpu_memory.sh:  source benchmarks/gpu_common.sh OUT_DIR
# Installs the carried wheels (.whl/: the GPU machine reaches no registry), prints the card and the stack, and defines
# run_bench NAME SECONDS PYTEST_ARGS...: one benchmark session with a time limit, whose JSON ($out/NAME.json) and
# table ($out/RESULTS-NAME.md) come back even when the limit cuts it off.
out="${1:-.benchmarks}"; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

valid() { python3 -c "import json, sys; json.load(open(sys.argv[1]))" "$1" 2>/dev/null; }

run_bench() {
  local name=$1 seconds=$2; shift 2
  rm -f "$out/$name.json" "$out/$name.json.partial"  # an earlier run's files must not pass for this run's
  # SIGINT first: pytest then ends the session and writes the JSON of every variant measured so far. A SIGINT heard
  # too late (inside a compile) runs on to the SIGKILL; then the .partial JSON, rewritten after each variant, stands in.
  timeout -s INT -k 20 "$seconds" python3 -m pytest -p no:cacheprovider -q -rs "$@" --benchmark-json "$out/$name.json"
  valid "$out/$name.json" || mv -f "$out/$name.json.partial" "$out/$name.json" 2>/dev/null
  valid "$out/$name.json" && python3 -m benchmarks.report "$out/$name.json" --output "$out/RESULTS-$name.md" --notes /dev/null
}
