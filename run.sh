#!/usr/bin/env bash
# ddiff's two entry points; each does all the set-up it needs on a fresh machine (Python 3.10+).
#   ./run.sh demo   build the tiny FLUX, train the demo LoRA on data/demo afresh, print where the outputs are
#   ./run.sh test   run the test suite (offline; installs Debian's chromium for the browser test when root)
#   ./run.sh directors  train three demo directors in one launch, then evaluate them (scripts/evaluate.py)
#   ./run.sh serve  the base-vs-LoRA web page on 127.0.0.1:7860 (after ./run.sh demo)
#   ./run.sh bench  run the benchmark suite on the small model (CPU) 3 times and regenerate benchmarks/RESULTS.md
#   ./run.sh setup  only create .venv and install ddiff with its dev extras
set -euo pipefail
cd "$(dirname "$0")"
VENV="${DDIFF_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.ddiff-setup"
  if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt run.sh ]; then return; fi
  "$PY" -m pip install -q --upgrade pip
  # Pinned first: an unpinned torch pulls a multi-GB CUDA build; on this kind of machine 2.13.0 is the CPU build on disk.
  "$PY" -m pip install -q "torch==${DDIFF_TORCH_VERSION:-2.13.0}"
  "$PY" -m pip install -q -e ".[dev]"
  touch "$stamp"
}

case "${1:-}" in
  setup) setup ;;
  demo)
    setup
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    [ -f models/tiny-flux/model_index.json ] || "$PY" -m ddiff_core.tiny --family flux --output_dir models/tiny-flux
    shift
    # The demo starts afresh each time (replacing an earlier demo run), unless asked to resume it.
    fresh=(--overwrite_output_dir); [[ " $* " == *" --resume_from_checkpoint"* ]] && fresh=()
    "$VENV/bin/accelerate" launch --config_file accelerate_configs/cpu.yaml scripts/train_lora.py --config configs/demo.yaml \
      "${fresh[@]}" "$@"
    ;;
  directors)
    setup
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    [ -f models/tiny-flux/model_index.json ] || "$PY" -m ddiff_core.tiny --family flux --output_dir models/tiny-flux
    [ -f models/tiny-clip/config.json ] || "$PY" -m ddiff_core.tiny --clip --output_dir models/tiny-clip
    [ -f data/directors/noir/metadata.jsonl ] || "$PY" -m ddiff_core.demo_directors --output_dir data/directors
    shift
    # A re-run skips the directors already trained and resumes a half-trained one.
    "$VENV/bin/accelerate" launch --config_file accelerate_configs/cpu.yaml scripts/train_lora.py \
      --config configs/directors.yaml "$@"
    "$PY" scripts/evaluate.py --lora_dir outputs/directors --clip_model models/tiny-clip --seeds 0,1,2,3 \
      --num_inference_steps 4
    ;;
  test)
    setup
    # The browser test drives Debian's chromium (a test tool's own browser download does not work offline).
    if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "note: could not install chromium; the browser test will be skipped" >&2
    fi
    shift
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$PY" -m pytest "$@"
    ;;
  serve)
    setup
    shift
    HF_HUB_OFFLINE=1 "$PY" scripts/serve.py "$@"
    ;;
  bench)
    setup
    shift
    mkdir -p benchmarks/results
    rm -f benchmarks/results/small-cpu*.json
    # Several sessions: the verdicts' noise is the spread of the before/after ratio between them.
    for session in $(seq "${DDIFF_BENCH_SESSIONS:-3}"); do
      HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$PY" -m pytest benchmarks/test_fixes.py benchmarks/test_buckets.py -p no:cacheprovider --model-size small \
        --benchmark-json "benchmarks/results/small-cpu-$session.json" "$@"
    done
    "$PY" -m benchmarks.report benchmarks/results/*.json --output benchmarks/RESULTS.md
    ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
