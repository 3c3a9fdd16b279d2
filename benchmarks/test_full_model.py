"""The trainer's own step at FLUX.1-dev's transformer shape (19 double + 38 single blocks, hidden 3072, 24 heads,
~11.9B parameters; random bf16 weights built directly on the GPU): eager vs regional `--compile`, gradient
checkpointing off / every block / every other block, at 1024 and 512 px (batch 1, and 2 at 512), and the eager step
with peft's round-trip input casts kept (what `skip_lora_input_casts` removes).

    pytest benchmarks/test_full_model.py --device cuda --dtype bf16 --model-size full -m gpu \\
        --benchmark-json .benchmarks/full.json

The step is built by ddiff's builders (`add_trainable_lora` with its checkpointing and compile settings,
`build_optimizer`, `build_lr_scheduler`) and run as the trainer runs it (`compute_loss` over cached features,
backward, clip, step, schedule, zero_grad). Reported: seconds per step, peak memory, model FLOPs utilisation (MFU)
against the card's dense bf16 peak, and the graphs compiled. With --model-size tiny or small the same code runs on the
local random model (CPU), so CI keeps it working.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks.cases import model_dir, sync
from benchmarks.harness import profile_kernels, versions
from ddiff_core.builders import (add_trainable_lora, build_lr_scheduler, build_optimizer, remove_trainable_lora,
                                 trainable_params)
from ddiff_core.caching import FeatureCache, TrainingFeatures
from ddiff_core.config import TrainConfig
from ddiff_core.families import get_family
from ddiff_core.speed import (check_attention_backend, compiled_graphs, reset_attention_backend, set_attention_backend,
                              skip_lora_input_casts)
from ddiff_core.trainer import compute_loss

FLUX_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense (no sparsity) bf16 tensor-core peaks
TEXT_TOKENS = 512
# (resolution, batch, compile, checkpointing interval or 0, peft's input casts kept), in the order a short window
# should measure them: the goal's configuration eager and compiled; then the eager variants (seconds each): the
# checkpointing doses, the kept casts (the "before" of skip_lora_input_casts), 512 px; last the compiled ones that
# need new graphs (a minute or more each at this size), which gpu_run.sh's 280 s limit may cut off.
FULL_VARIANTS = [(1024, 1, False, 0, False), (1024, 1, True, 0, False),
                 (1024, 1, False, 1, False), (1024, 1, False, 2, False), (1024, 1, False, 0, True),
                 (512, 1, False, 0, False), (512, 2, False, 0, False),
                 (1024, 1, True, 1, False), (1024, 1, True, 2, False), (512, 1, True, 0, False), (512, 2, True, 0, False)]

KERNEL_TABLE_VARIANTS = (0, 1)  # the goal's configuration, eager and compiled: where its GPU time goes


def _peak_flops() -> float:
    if not torch.cuda.is_available():
        return float("nan")
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), float("nan"))


def step_flops(model, image_tokens: int, text_tokens: int, batch: int = 1) -> float:
    """A frozen-base LoRA step: ~2x the forward FLOPs of the linear layers (forward + input gradients; no weight
    gradients for frozen weights) plus ~3x the attention FLOPs (forward + two backward matmuls)."""
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    seq = image_tokens + text_tokens
    linear = 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            if name.endswith("norm.linear") or name.endswith("norm1.linear") or name.endswith("norm1_context.linear") \
                    or not name.startswith(("transformer_blocks", "single_transformer_blocks")):
                # modulation from the timestep embedding: one token; top-level embedders/output handled here too
                tokens = {"x_embedder": image_tokens, "proj_out": image_tokens, "context_embedder": text_tokens}.get(name, 1)
            elif name.startswith("transformer_blocks") and ("add_" in name or "ff_context" in name):
                tokens = text_tokens  # the text stream's own weights
            elif name.startswith("transformer_blocks"):
                tokens = image_tokens
            else:
                tokens = seq  # single blocks see the joint sequence
            linear += 2 * module.in_features * module.out_features * tokens
    layers = model.config.num_layers + model.config.num_single_layers
    attention = layers * 4 * seq * seq * hidden  # QK^T and AV
    return batch * (2 * linear + 3 * attention)


@pytest.fixture(scope="module")
def base(bench_env):
    """(family, components, weight dtype, text tokens, text width, pooled width, variants) for the size asked."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = get_family("flux")
    if bench_env.size == "full":
        if not torch.cuda.is_available() or torch.device(bench_env.device).type != "cuda":
            pytest.skip("the full FLUX shape needs a CUDA device")
        model = build_full_flux(bench_env.device)
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the trainer does: its backward crashed on H100/H200
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        comps = {"transformer": model, "scheduler": scheduler}
        return family, comps, torch.bfloat16, TEXT_TOKENS, 4096, 768, FULL_VARIANTS
    comps = family.load_components(str(model_dir(bench_env.size)), dtype=bench_env.torch_dtype)
    comps["transformer"].to(bench_env.device)
    cfg = comps["transformer"].config
    side = bench_env.resolution
    variants = [(side, 1, False, 0, False), (side, 1, True, 0, False), (side, 1, False, 2, False)]
    if bench_env.torch_dtype != torch.float32:  # in fp32 there is no autocast and no cast to skip
        variants.append((side, 1, False, 0, True))
    return family, comps, bench_env.torch_dtype, 32, cfg.joint_attention_dim, cfg.pooled_projection_dim, variants


def _variant_id(v) -> str:
    resolution, batch, compile, interval, peft_casts = v
    ckpt = "no-ckpt" if not interval else ("ckpt-every" if interval == 1 else f"ckpt-every-{interval}")
    return f"{resolution}px-b{batch}-{'compile' if compile else 'eager'}-{ckpt}" + ("-peft-casts" if peft_casts else "")


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(FULL_VARIANTS)))
def test_full_flux_trainer_step(benchmark, bench_env, base, index):
    if bench_env.size != "full":
        pytest.skip("needs --model-size full")
    _run_variant(benchmark, bench_env, base, index)


@pytest.mark.parametrize("index", range(4))
def test_trainer_step_small(benchmark, bench_env, base, index):
    if bench_env.size == "full":
        pytest.skip("the full shape runs as test_full_flux_trainer_step")
    _run_variant(benchmark, bench_env, base, index)


def _run_variant(benchmark, bench_env, base, index):
    family, comps, dtype, text_tokens, text_width, pooled_width, variants = base
    if index >= len(variants):
        pytest.skip("no such variant at this size")
    resolution, batch, compile, interval, peft_casts = variants[index]
    device = torch.device(bench_env.device)
    model = comps["transformer"]
    cfg = TrainConfig(learning_rate=1e-4, rank=16, lora_alpha=16, max_grad_norm=1.0)
    benchmark.group = f"trainer-step-{resolution}px-b{batch}"
    benchmark.extra_info.update(case="full_flux_trainer" if bench_env.size == "full" else "trainer_step",
                                variant=_variant_id(variants[index]) + (f"-{bench_env.attention}" if bench_env.attention
                                                                         else ""), resolution=resolution, batch=batch,
                                compile=compile, checkpointing_interval=interval, peft_input_casts=peft_casts,
                                attention_backend=bench_env.attention or "native", size=bench_env.size,
                                device=bench_env.device, **versions())
    optimizer = None
    try:
        if bench_env.attention:  # as the trainer sets it: before the LoRA and the compile
            check_attention_backend(bench_env.attention, device.type, family)
            set_attention_backend(model, bench_env.attention)
        add_trainable_lora(model, family, rank=cfg.rank, alpha=cfg.lora_alpha, dropout=0.0, lora_layers=None, seed=0,
                           gradient_checkpointing=bool(interval), checkpointing_interval=max(interval, 1),
                           compile=compile)
        if peft_casts:
            skip_lora_input_casts(model, skip=False)  # peft's default: the "before"
        graphs_before = compiled_graphs()
        model.train()
        step, optimizer = trainer_step(family, comps, model, dtype, device, resolution, batch, text_tokens, text_width,
                                       pooled_width, cfg)
        side = resolution // 8
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            start = time.perf_counter()
            step()  # the first step compiles (its time is the cold start); then one alone for the peak memory
            benchmark.extra_info["first_step_s"] = time.perf_counter() - start
            step()
        except torch.cuda.OutOfMemoryError:
            pytest.skip(f"out of memory: {_variant_id(variants[index])}")
        if device.type == "cuda":
            benchmark.extra_info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
            benchmark.extra_info["host_syncs"] = host_syncs(step)
        benchmark.pedantic(step, rounds=5 if bench_env.size == "full" else 3, warmup_rounds=1, iterations=1)
        flops = step_flops(model, (side // 2) ** 2, text_tokens, batch)
        benchmark.extra_info.update(step_tflop=flops / 1e12, graphs=compiled_graphs() - graphs_before,
                                    params_b=sum(p.numel() for p in model.parameters()) / 1e9)
        if benchmark.stats:  # None with --benchmark-disable
            benchmark.extra_info["mfu"] = flops / benchmark.stats.stats.median / _peak_flops()
        if device.type == "cuda" and bench_env.size == "full" and index in KERNEL_TABLE_VARIANTS:
            benchmark.extra_info["kernels"] = profile_kernels(step)  # after the timing: the profiler slows the host
    finally:
        try:
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            remove_trainable_lora(model, family)
        finally:
            if bench_env.attention:
                reset_attention_backend(model)  # diffusers' attention entries back, whatever happened
            if device.type == "cuda":
                torch.cuda.empty_cache()


def trainer_step(family, comps, model, dtype, device, resolution, batch, text_tokens, text_width, pooled_width, cfg):
    """(step, optimizer): one optimizer step as the trainer takes it, over cached features of this shape."""
    params = trainable_params(model)
    optimizer = build_optimizer(params, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg, max_train_steps=1000)
    objective = family.training_objective(comps, family.loss_settings())
    latent_norm = family.latent_norm(comps["vae"].config) if comps.get("vae") is not None else _flux_norm()
    side = resolution // 8
    channels = model.config.in_channels // 4
    # Cached features as the caches hold them: the latent distribution (mean and log-variance) and the embeddings.
    features = TrainingFeatures(family, comps, device=device, max_sequence_length=text_tokens,
                                latent_cache=FeatureCache({"latent_dist": [torch.randn(2 * channels, side, side)
                                                                           for _ in range(batch)]}),
                                text_cache=FeatureCache({"prompt_embeds": [torch.randn(text_tokens, text_width)] * batch,
                                                         "pooled_prompt_embeds": [torch.randn(pooled_width)] * batch}))
    batch_input = {"indices": torch.arange(batch)}
    generator = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)

    def step(wait: bool = True):
        loss = compute_loss(objective, model, features, latent_norm, batch_input, generator, dtype, autocast=autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if wait:
            sync(str(device))

    return step, optimizer


def host_syncs(step) -> int:
    """How often one step (without its final wait) makes the host wait for the GPU: torch's sync debug mode warns
    at each synchronizing call (an item(), a copy to the host or from pageable memory, ...)."""
    import warnings

    sync(str(torch.device("cuda")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(wait=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(str(torch.device("cuda")))
    return sum("synchroniz" in str(w.message) for w in caught)


def build_full_flux(device, **shape) -> torch.nn.Module:
    """FLUX.1-dev's transformer (or ``shape``) with random bf16 weights, built on ``device`` (24 GB; no fp32 copy, no
    disk)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**(shape or FLUX_DEV))
    finally:
        torch.set_default_dtype(default_dtype)
    return model.requires_grad_(False)


def _flux_norm():
    from ddiff_core.latents import LatentNorm

    return LatentNorm(shift=0.1159, scale=0.3611)  # FLUX.1's VAE
