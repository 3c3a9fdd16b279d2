"""Three directors on the small model: one launch of three runs against three launches of one run each.

    python -m benchmarks.multi_run [--steps 20] [--resolution 128] [--output benchmarks/results/multi-run-cpu.json]

Each launch is a real process (`scripts/train_lora.py`, as a user runs it), so the three separate launches pay what
a user pays: the interpreter and library imports, the base model's load, the encoders' passes. Reported: the wall time
of each way, the time each spends loading the base model (from the launch's log), and a check that each director's
LoRA is the same either way (torch.equal).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from benchmarks.cases import model_dir
from benchmarks.harness import cpu_description
from ddiff_core.demo_directors import make_directors

REPO = Path(__file__).resolve().parents[1]
NAMES = ("teal", "pastel", "noir")
LOADED = re.compile(r"loaded the base model in ([0-9.]+) s")


def _launch(config: Path) -> tuple[float, float]:
    """(wall seconds, base-model load seconds) of one `scripts/train_lora.py --config` process."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "train_lora.py"), "--config", str(config)],
                            cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{config} failed:\n{result.stderr[-3000:]}")
    match = LOADED.search(result.stderr)
    return wall, float(match.group(1)) if match else float("nan")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "multi-run-cpu.json")
    args = parser.parse_args(argv)
    model = model_dir(args.size)
    with tempfile.TemporaryDirectory(prefix="ddiff-multi-run-") as tmp:
        root = Path(tmp)
        data = make_directors(root / "data", names=NAMES)
        shared = {"pretrained_model_name_or_path": str(model), "resolution": args.resolution, "train_batch_size": 1,
                  "max_train_steps": args.steps, "max_sequence_length": 64, "seed": 0, "report_to": "none",
                  "cache_latents": True, "holdout": 3, "learning_rate": 1e-3}
        one = root / "one.yaml"
        one.write_text(yaml.safe_dump({**shared, "output_dir": str(root / "one"),
                                       "runs": [{"name": n, "instance_data_dir": str(data[n])} for n in NAMES]}))
        one_wall, one_load = _launch(one)
        separate = []
        for name in NAMES:
            config = root / f"{name}.yaml"
            config.write_text(yaml.safe_dump({**shared, "output_dir": str(root / "three" / name),
                                              "instance_data_dir": str(data[name])}))
            separate.append(_launch(config))
        same = []
        for name in NAMES:
            a = load_file(root / "one" / name / "pytorch_lora_weights.safetensors")
            b = load_file(root / "three" / name / "pytorch_lora_weights.safetensors")
            same.append(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
    result = {
        "model": f"flux {args.size}", "resolution": args.resolution, "steps_per_director": args.steps,
        "cpu": cpu_description(), "torch": torch.__version__,
        "one_launch": {"wall_s": one_wall, "base_load_s": one_load},
        "three_launches": {"wall_s": sum(w for w, _ in separate), "base_load_s": sum(l for _, l in separate),
                           "each": [{"director": n, "wall_s": w, "base_load_s": l} for n, (w, l) in zip(NAMES, separate)]},
        "same_loras": all(same),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))


def render(result: dict) -> str:
    one, three = result["one_launch"], result["three_launches"]
    return "\n".join([
        f"## Three directors: one launch vs three ({result['model']}, {result['resolution']} px, "
        f"{result['steps_per_director']} steps each)", "",
        f"CPU {result['cpu'][0]} ({result['cpu'][1]}); torch {result['torch']}. Each launch is a `scripts/train_lora.py` process; the LoRAs "
        f"are {'identical (torch.equal)' if result['same_loras'] else 'NOT identical'} either way.", "",
        "| | wall time | loading the base model |", "|---|---|---|",
        f"| one launch, 3 runs | {one['wall_s']:.1f} s | {one['base_load_s']:.2f} s (once) |",
        f"| three launches | {three['wall_s']:.1f} s | {three['base_load_s']:.2f} s (3 x "
        f"{three['base_load_s'] / 3:.2f} s) |",
        f"| saved | {three['wall_s'] - one['wall_s']:.1f} s ({1 - one['wall_s'] / three['wall_s']:.0%}) | "
        f"{three['base_load_s'] - one['base_load_s']:.2f} s |", ""])


if __name__ == "__main__":
    main()
