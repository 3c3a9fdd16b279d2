"""Optimizer-step time with 4 accumulated micro-batches under DDP: all-reduce every micro-batch vs only the last.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/cpu_ddp.yaml \\
        benchmarks/ddp_accumulation.py --size tiny --mode no_sync

Prints one JSON line (rank 0): the median seconds per optimizer step over the timed steps.
"""

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
from accelerate import Accelerator

from benchmarks.cases import Env, _components
from ddiff_core.builders import add_trainable_lora, build_optimizer, trainable_params
from ddiff_core.config import TrainConfig
from ddiff_core.process import run_process


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--family", default="flux")
    parser.add_argument("--mode", choices=["no_sync", "sync_every_step"], required=True)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    acc = Accelerator()
    env = Env(args.size, str(acc.device), "fp32", args.family)
    family, comps = _components(env)
    objective = family.training_objective(comps, family.loss_settings())
    denoiser = comps[family.denoiser_name]
    add_trainable_lora(denoiser, family, rank=16, alpha=16, dropout=0.0, lora_layers=None, seed=0)
    optimizer = build_optimizer(trainable_params(denoiser), TrainConfig())
    denoiser, optimizer = acc.prepare(denoiser, optimizer)
    side = env.resolution // 8
    latents = torch.randn(2, comps["vae"].config.latent_channels, side, side, device=acc.device)
    embeds = family.encode_prompts(comps, ["<t> a still", "<t> another"], device=acc.device, max_sequence_length=64)
    generator = torch.Generator(acc.device).manual_seed(acc.process_index)
    times = []
    for step in range(args.steps + 2):
        acc.wait_for_everyone()
        start = time.perf_counter()
        for micro in range(4):
            last = micro == 3
            context = nullcontext() if last or args.mode == "sync_every_step" else acc.no_sync(denoiser)
            with context:
                loss = objective.loss(denoiser, latents, embeds, generator)
                acc.backward(loss / 4)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    if acc.is_main_process:
        print(json.dumps({"median_step_s": statistics.median(times), "steps": len(times), "mode": args.mode}))
    return 0


if __name__ == "__main__":
    run_process(main)
