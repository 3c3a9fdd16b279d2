"""Peak memory and seconds per step of the trainer's step at FLUX.1-dev's transformer shape with a quantized frozen
base: bf16, int8, fp8 and NF4 with AdamW, and NF4 with 8-bit Adam; 1024 px, batch 1, gradient checkpointing on.
Goal: at most 24 GiB with fp8 or int8, at most 16 GiB with NF4 and 8-bit Adam.

    pytest benchmarks/test_memory.py --device cuda --dtype bf16 --model-size full -m gpu \\
        --benchmark-json .benchmarks/memory.json

Each variant builds a fresh random bf16 model on the GPU and quantizes it in memory with the libraries diffusers'
quantization configs use (torchao's quantize_, bitsandbytes' 4-bit layers). With --model-size tiny the same code runs
int8 on the CPU, so CI keeps it working.
"""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch

from benchmarks.cases import model_dir
from benchmarks.harness import versions
from benchmarks.test_full_model import TEXT_TOKENS, build_full_flux, trainer_step
from ddiff_core.builders import add_trainable_lora
from ddiff_core.config import TrainConfig
from ddiff_core.families import get_family
from ddiff_core.memory import estimate_peak
from ddiff_core.quantization import check_quantization, quantize_in_memory
from ddiff_core.speed import repeated_blocks

VARIANTS = [("none", False), ("int8", False), ("fp8", False), ("nf4", False), ("nf4", True)]


def _build(bench_env, quantization: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = get_family("flux")
    if bench_env.size == "full":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the trainer does: its backward crashed on H100/H200
        model = build_full_flux(bench_env.device)
        comps = {"transformer": model, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)}
        shape = (TEXT_TOKENS, 4096, 768, 1024)
    else:
        comps = family.load_components(str(model_dir(bench_env.size)))
        model = comps["transformer"].to(bench_env.device)
        shape = (32, model.config.joint_attention_dim, model.config.pooled_projection_dim, bench_env.resolution)
    quantize_in_memory(model, quantization, torch.bfloat16)
    return family, comps, model, shape


@pytest.mark.parametrize("quantization, eight_bit_adam", VARIANTS, ids=[f"{q}{'-adam8bit' if a else ''}"
                                                                       for q, a in VARIANTS])
def test_quantized_base_step(benchmark, bench_env, quantization, eight_bit_adam):
    device = torch.device(bench_env.device)
    if bench_env.size == "full" and device.type != "cuda":
        pytest.skip("the full FLUX shape needs a CUDA device")
    if bench_env.size != "full" and (quantization not in ("none", "int8") or eight_bit_adam):
        pytest.skip("fp8 and NF4 need a GPU; the small sizes run bf16 and int8 only")
    if quantization != "none":
        try:
            check_quantization(quantization, device.type)
        except ValueError as err:
            pytest.skip(str(err))
    if eight_bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # What an earlier variant may still hold (a failed one's traceback keeps its frames): reported beside the peak.
    held_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = comps = step = optimizer = None
    try:  # everything inside: a failed variant must not keep a 24 GB model alive for the next one
        family, comps, model, (text_tokens, text_width, pooled_width, resolution) = _build(bench_env, quantization)
        cfg = TrainConfig(learning_rate=1e-4, rank=16, lora_alpha=16, max_grad_norm=1.0, use_8bit_adam=eight_bit_adam)
        add_trainable_lora(model, family, rank=16, alpha=16, dropout=0.0, lora_layers=None, seed=0,
                           gradient_checkpointing=True)
        model.train()
        dtype = torch.bfloat16
        step, optimizer = trainer_step(family, comps, model, dtype, device, resolution, 1, text_tokens, text_width,
                                       pooled_width, cfg)
        estimate = estimate_peak(comps, model, repeated_blocks(model, family),
                                 tokens=(resolution // 16) ** 2 + text_tokens, batch=1, checkpointing_interval=1,
                                 weight_dtype=dtype, eight_bit_adam=eight_bit_adam)
        benchmark.group = f"quantized-base-{resolution}px"
        benchmark.extra_info.update(case="quantized_base" if bench_env.size == "full" else "quantized_base_small",
                                    variant=benchmark.name.split("[")[-1].rstrip("]"), quantization=quantization,
                                    eight_bit_adam=eight_bit_adam, resolution=resolution, size=bench_env.size,
                                    device=bench_env.device, estimate_mb=estimate.total / 2**20,
                                    held_before_mb=held_before / 2**20, **versions())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            step()
            step()
        except torch.cuda.OutOfMemoryError:
            pytest.skip(f"out of memory with {quantization}")
        if device.type == "cuda":
            benchmark.extra_info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        benchmark.pedantic(step, rounds=3, warmup_rounds=0, iterations=1)
    finally:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        del step, optimizer, model, comps
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
