"""peft's round-trip casts of the LoRA inputs, kept (peft's default) vs skipped (ddiff), in one cached bf16 step.

    python -m benchmarks.lora_casts [--size small] [--pairs 40] [--output benchmarks/results/lora-casts-cpu.json]

The frozen weights are bf16 and the LoRA fp32 under autocast, as the trainer runs them. Reported per step: the dtype
casts (``aten::_to_copy`` calls) and the bytes they write, which do not depend on the machine; the step time, from
the two variants interleaved in one process (kept, skipped, skipped, kept, ...) so that drift of a noisy machine
falls on both alike; and whether the loss and every LoRA gradient are bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.cases import Env, _training, sync
from benchmarks.harness import cpu_description
from benchmarks.test_full_model import keep_lora_input_casts
from ddiff_core.speed import skip_lora_input_casts
from ddiff_core.trainer import compute_loss

REPO = Path(__file__).resolve().parents[1]


class CastCounter(TorchDispatchMode):
    """Counts ``aten::_to_copy`` calls (every dtype or device cast) and the bytes they produce."""

    def __init__(self):
        super().__init__()
        self.calls = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            self.calls += 1
            self.bytes += out.numel() * out.element_size()
        return out


def _set_casts(denoiser, kept: bool) -> None:
    if kept:
        keep_lora_input_casts(denoiser)
    elif not skip_lora_input_casts(denoiser):
        raise SystemExit("skip_lora_input_casts changed no layer of this bf16 model")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "lora-casts-cpu.json")
    args = parser.parse_args(argv)
    t = _training(Env(size=args.size, device=args.device), weight_dtype=torch.bfloat16)
    batch = next(t.batches)
    with torch.no_grad():  # a trained-looking LoRA (B is zero at init), so its path carries gradient to the inputs
        for param in t.denoiser.parameters():
            if param.requires_grad:
                param.normal_(std=0.02, generator=torch.Generator(param.device).manual_seed(1))

    def loss_and_grads(kept: bool):
        _set_casts(t.denoiser, kept)
        t.generator.manual_seed(0)
        t.denoiser.zero_grad(set_to_none=True)
        counter = CastCounter()
        with counter:
            loss = compute_loss(t.objective, t.denoiser, t.features, t.latent_norm, batch, t.generator,
                                t.weight_dtype, autocast=t.autocast)
            loss.backward()
        grads = [p.grad.clone() for p in t.denoiser.parameters() if p.requires_grad]
        return loss.detach(), grads, counter

    kept, skipped = loss_and_grads(True), loss_and_grads(False)
    equal = torch.equal(kept[0], skipped[0]) and all(torch.equal(a, b) for a, b in zip(kept[1], skipped[1]))

    def step(kept_casts: bool) -> float:
        _set_casts(t.denoiser, kept_casts)
        start = time.perf_counter()
        t.optimizer.zero_grad(set_to_none=True)
        compute_loss(t.objective, t.denoiser, t.features, t.latent_norm, next(t.batches), t.generator,
                     t.weight_dtype, autocast=t.autocast).backward()
        t.optimizer.step()
        sync(args.device)
        return time.perf_counter() - start

    for _ in range(3):
        step(False)
    times = {True: [], False: []}
    for i in range(args.pairs):
        for kept_casts in ((True, False) if i % 2 == 0 else (False, True)):
            times[kept_casts].append(step(kept_casts))
    ratios = sorted(a / b for a, b in zip(times[True], times[False]))
    quartiles = statistics.quantiles(ratios, n=4)
    result = {
        "model": f"flux {args.size}", "device": args.device, "cpu": cpu_description(), "torch": torch.__version__,
        "bitwise_equal": equal, "pairs": args.pairs,
        "kept": {"casts": kept[2].calls, "cast_mb": kept[2].bytes / 2**20, "median_s": statistics.median(times[True])},
        "skipped": {"casts": skipped[2].calls, "cast_mb": skipped[2].bytes / 2**20,
                    "median_s": statistics.median(times[False])},
        "ratio_median": statistics.median(ratios), "ratio_q1": quartiles[0], "ratio_q3": quartiles[2],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))


def render(result: dict) -> str:
    kept, skipped = result["kept"], result["skipped"]
    return "\n".join([
        f"## peft's LoRA input casts under autocast: kept vs skipped ({result['model']}, bf16 base, fp32 LoRA, "
        f"{result['device']})", "",
        f"CPU {result['cpu'][0]} ({result['cpu'][1]}); torch {result['torch']}. One cached training step (forward and "
        f"backward). Casts and bytes are counted (`aten::_to_copy`), not timed. Time: {result['pairs']} interleaved "
        f"pairs in one process; ratio = kept / skipped per pair, median and quartiles. Loss and LoRA gradients "
        f"{'bitwise equal' if result['bitwise_equal'] else 'NOT equal'}. Command: `python -m benchmarks.lora_casts`.", "",
        "| peft input casts | casts per step | MiB cast per step | step (median) |", "|---|---|---|---|",
        f"| kept (peft's default) | {kept['casts']} | {kept['cast_mb']:.1f} | {kept['median_s'] * 1e3:.1f} ms |",
        f"| skipped (ddiff) | {skipped['casts']} | {skipped['cast_mb']:.1f} | {skipped['median_s'] * 1e3:.1f} ms |",
        f"| ratio | {kept['casts'] / skipped['casts']:.2f}x fewer | {kept['cast_mb'] / skipped['cast_mb']:.2f}x less | "
        f"{result['ratio_median']:.2f} ({result['ratio_q1']:.2f}-{result['ratio_q3']:.2f}) |", ""])


if __name__ == "__main__":
    main()
