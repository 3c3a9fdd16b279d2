"""ddiff's training step beside diffusers' upstream FLUX LoRA script, on the same small model, data and settings.

    python -m benchmarks.upstream_pair --upstream-script PATH/TO/train_dreambooth_lora_flux.py \\
        [--steps 40] [--rounds 6] [--resolution 128] [--output benchmarks/results/upstream-pair-cpu.json]

The upstream script is not part of ddiff and ships in no package: take it from a diffusers checkout
(`examples/dreambooth/train_dreambooth_lora_flux.py`; the result records its sha256 and the diffusers version its
``check_min_version`` asks for, beside the installed one). Both scripts run as a user runs them, one process each, for
``--rounds`` rounds in ABBA order (upstream first in odd rounds, ddiff first in even ones) so that drift on a noisy
machine falls on both, and each is clocked by `benchmarks.step_clock` (the gap between the ends of consecutive
optimizer steps; start-up, loading and caching are not in it; the first three steps are left out). Same small random FLUX, same images and one instance prompt, latents cached, prompt
embeddings computed once (upstream does that for a single instance prompt, ddiff caches them), same LoRA targets
(upstream's default list; ddiff's ``--lora_layers upstream``) and rank, batch 1, bf16 frozen weights, AdamW, constant
LR. The two runs must train the same number of LoRA parameters, or the comparison is refused.

What differs is what each script does per step: ddiff keeps the LoRA in fp32 under autocast (upstream keeps it in the
frozen weights' bf16 unless the precision is fp16), and each has its own loop around the same denoiser. What bf16
LoRA weights cost upstream besides time is measured too (`bf16_update_survival`): the share of peft's Gaussian
``lora_A`` entries that AdamW can still move at the pair's learning rate.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.cases import model_dir
from benchmarks.harness import cpu_description, versions
from benchmarks.step_clock import step_times

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a film still"


def torchvision_imports() -> bool:
    """Whether the real torchvision imports here (the registry's build needs CUDA torch; ddiff's CPU machine has none)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    probe = subprocess.run([sys.executable, "-c", "import torchvision.transforms"], capture_output=True)
    return probe.returncode == 0


def shared_args(model: Path, data: Path, resolution: int, steps: int, rank: int, seed: int) -> list[str]:
    """The flags both scripts take, with the same meaning."""
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", PROMPT, "--resolution", str(resolution), "--center_crop", "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--rank", str(rank), "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--mixed_precision", "bf16", "--cache_latents",
            "--max_sequence_length", "64", "--seed", str(seed), "--checkpointing_steps", "1000000",
            "--dataloader_num_workers", "0", "--report_to", "tensorboard"]


def clocked_run(script: Path, args: list[str], out: Path, torchvision_shim: bool = False) -> dict:
    """One clocked process of ``script``: its step times (s) and the LoRA parameters its optimizer held."""
    clock = out / "clock.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DDIFF_STEP_CLOCK": str(clock),
           "DDIFF_TORCHVISION_SHIM": "1" if torchvision_shim else "0",
           "PYTHONPATH": os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    result = subprocess.run([sys.executable, "-m", "benchmarks.step_clock", str(script), *args,
                             "--output_dir", str(out / "run")], cwd=out, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{script.name} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    record = json.loads(clock.read_text())
    if len(record["step_ends"]) < 3:
        raise SystemExit(f"{script.name}: only {len(record['step_ends'])} optimizer steps were clocked")
    return {"step_s": step_times(record["step_ends"], warmup=2), "trainable_params": record["trainable_params"]}


def bf16_update_survival(rank: int = 4, width: int = 3072, steps: int = 10, lr: float = 1e-4, seed: int = 0) -> dict:
    """The share of a ``lora_A`` (rank x width, peft's Gaussian init: std 1/rank) whose entries AdamW has moved after
    ``steps`` steps at ``lr``, kept in bf16 (upstream under bf16) and in fp32 (ddiff), with the same random gradients.

    AdamW moves a weight by about the learning rate per step; in bf16 that is under half the spacing of any weight
    above 1/32 in magnitude at lr 1e-4, so the update rounds away.
    """
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(rank, width, generator=gen) / rank
    grads = [torch.randn(rank, width, generator=gen) for _ in range(steps)]
    moved = {}
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.nn.Parameter(init.to(dtype))
        start = weight.detach().clone()
        optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=1e-4, foreach=False)
        for grad in grads:
            weight.grad = grad.to(dtype)
            optimizer.step()
        moved[str(dtype).removeprefix("torch.")] = float((weight.detach() != start).float().mean())
    return {"rank": rank, "width": width, "steps": steps, "lr": lr, "moved": moved}


def script_provenance(script: Path) -> dict:
    """What identifies the upstream script a result came from: its sha256 and the diffusers version it asks for."""
    text = script.read_bytes()
    wanted = re.search(rb'check_min_version\(\s*"([^"]+)"', text)
    return {"sha256": hashlib.sha256(text).hexdigest(), "check_min_version": wanted.group(1).decode() if wanted else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-script", type=Path, required=True)
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "upstream-pair-cpu.json")
    args = parser.parse_args(argv)
    if not args.upstream_script.is_file():
        raise SystemExit(f"--upstream-script: no such file: {args.upstream_script}")
    if args.steps < 5 or args.rounds < 1:
        raise SystemExit("--steps must be at least 5 and --rounds at least 1")
    model = model_dir(args.size)
    shim = not torchvision_imports()
    sides = {"upstream": (args.upstream_script.resolve(), []),
             "ddiff": (REPO / "scripts" / "train_lora.py", ["--lora_layers", "upstream"])}
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="ddiff-upstream-pair-") as tmp:
        data = Path(tmp) / "images"  # upstream opens every file of the folder as an image: images alone
        data.mkdir()
        for image in sorted((REPO / "data" / "demo").glob("*.jpg")):
            shutil.copy(image, data / image.name)
        base = shared_args(model, data, args.resolution, args.steps, args.rank, seed=0)
        for r in range(args.rounds):
            runs = {}
            order = list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]  # ABBA
            for side, (script, own) in order:
                out = Path(tmp) / f"{side}-{r}"
                out.mkdir()
                runs[side] = clocked_run(script, base + own, out, torchvision_shim=shim and side == "upstream")
                print(f"round {r + 1}/{args.rounds} {side}: {statistics.median(runs[side]['step_s']) * 1e3:.1f} ms/step",
                      flush=True)
            if runs["upstream"]["trainable_params"] != runs["ddiff"]["trainable_params"]:
                raise SystemExit(f"the scripts trained different LoRAs: upstream {runs['upstream']['trainable_params']:,}"
                                 f" parameters, ddiff {runs['ddiff']['trainable_params']:,}")
            rounds.append(runs)
    result = {
        "upstream_pair": True, "upstream_script": args.upstream_script.name,
        **{f"upstream_{k}": v for k, v in script_provenance(args.upstream_script).items()}, "model": f"flux {args.size}",
        "resolution": args.resolution, "steps": args.steps, "rank": args.rank,
        "trainable_params": rounds[0]["ddiff"]["trainable_params"], "torchvision": "shim" if shim else "real",
        "cpu": cpu_description(), "torch": torch.__version__,
        "versions": {k: v for k, v in versions().items() if k in ("diffusers", "transformers", "peft", "accelerate")},
        "rounds": [{side: {"median_step_s": statistics.median(run["step_s"]), "step_s": run["step_s"]}
                    for side, run in runs.items()} for runs in rounds],
        "bf16_lora_a": bf16_update_survival(rank=args.rank),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))


def render(result: dict) -> str:
    ratios = [r["ddiff"]["median_step_s"] / r["upstream"]["median_step_s"] for r in result["rounds"]]
    lines = [f"## ddiff's step beside upstream's `{result['upstream_script']}` ({result['model']}, "
             f"{result['resolution']} px, batch 1, rank {result['rank']})", "",
             f"Upstream script sha256 {result.get('upstream_sha256', 'n/a')[:12]}, asking for diffusers >= "
             f"{result.get('upstream_check_min_version')}.",
             f"CPU {result['cpu'][0]} ({result['cpu'][1]}); torch {result['torch']}, "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
             + f". Both scripts as processes, in ABBA order, {result['steps']} steps each, the first three left out; "
             f"{result['trainable_params']:,} LoRA parameters in both; latents cached, one instance prompt embedded "
             "once, bf16 frozen weights. Time per step: median gap between consecutive optimizer steps "
             f"(`benchmarks.step_clock`). torchvision: {result['torchvision']}. "
             "Command: `python -m benchmarks.upstream_pair --upstream-script PATH`.", "",
             "| round | upstream | ddiff | ddiff / upstream |", "|---|---|---|---|"]
    for i, (r, ratio) in enumerate(zip(result["rounds"], ratios), 1):
        lines.append(f"| {i} | {r['upstream']['median_step_s'] * 1e3:.1f} ms | {r['ddiff']['median_step_s'] * 1e3:.1f} ms "
                     f"| {ratio:.2f} |")
    lines += [f"| median | | | **{statistics.median(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f}) |", ""]
    survival = result.get("bf16_lora_a")
    if survival:
        lines += [f"Upstream keeps the LoRA in bf16 under bf16 mixed precision (ddiff: fp32 under autocast). Of a "
                  f"rank-{survival['rank']} `lora_A` ({survival['rank']} x {survival['width']}, peft's Gaussian init), "
                  f"AdamW at lr {survival['lr']:g} had moved {survival['moved']['bfloat16']:.1%} of the entries after "
                  f"{survival['steps']} steps in bf16, {survival['moved']['float32']:.1%} in fp32 (same gradients).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
