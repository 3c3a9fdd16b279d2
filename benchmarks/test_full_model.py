"""FLUX.1-dev's real transformer shape (19 double + 38 single blocks, hidden 3072, 24 heads, ~11.9B parameters),
random weights built directly on the GPU in bf16, one LoRA training step with cached latents and text embeddings.

    pytest benchmarks/test_full_model.py --device cuda --dtype bf16 --model-size full \\
        --benchmark-json .benchmarks/full.json

Reports seconds per step, peak memory and model FLOPs utilisation (MFU) against the card's dense bf16 peak.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import sync
from benchmarks.harness import versions
from ddiff_core.builders import add_trainable_lora, build_optimizer, trainable_params
from ddiff_core.config import LossSettings, TrainConfig
from ddiff_core.families import get_family

FLUX_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense (no sparsity) bf16 tensor-core peaks
TEXT_TOKENS = 512


def _peak_flops() -> float:
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), float("nan"))


def step_flops(model, image_tokens: int) -> float:
    """A frozen-base LoRA step: ~2x the forward FLOPs of the linear layers (forward + input gradients; no weight
    gradients for frozen weights) plus ~3x the attention FLOPs (forward + two backward matmuls)."""
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    seq = image_tokens + TEXT_TOKENS
    linear = 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            if name.endswith("norm.linear") or name.endswith("norm1.linear") or name.endswith("norm1_context.linear") \
                    or not name.startswith(("transformer_blocks", "single_transformer_blocks")):
                # modulation from the timestep embedding: one token; top-level embedders/output handled here too
                tokens = {"x_embedder": image_tokens, "proj_out": image_tokens, "context_embedder": TEXT_TOKENS}.get(name, 1)
            elif name.startswith("transformer_blocks") and ("add_" in name or "ff_context" in name):
                tokens = TEXT_TOKENS  # the text stream's own weights
            elif name.startswith("transformer_blocks"):
                tokens = image_tokens
            else:
                tokens = seq  # single blocks see the joint sequence
            linear += 2 * module.in_features * module.out_features * tokens
    layers = model.config.num_layers + model.config.num_single_layers
    attention = layers * 4 * seq * seq * hidden  # QK^T and AV
    return 2 * linear + 3 * attention


@pytest.fixture(scope="module")
def full_model(bench_env):
    if bench_env.size != "full":
        pytest.skip("needs --model-size full")
    if not torch.cuda.is_available() or torch.device(bench_env.device).type != "cuda":
        pytest.skip("the full FLUX shape needs a CUDA device")
    from diffusers import FluxTransformer2DModel

    # Seen on an H100 with torch 2.11 + cu130: the cuDNN attention backward hits an illegal memory access on the
    # second step (flash and math backends are fine), so this benchmark runs on flash attention.
    torch.backends.cuda.enable_cudnn_sdp(False)
    family = get_family("flux")
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: 24 GB, never an fp32 copy
    try:
        with torch.device(bench_env.device):  # random init directly on the GPU: no hub, no CPU detour
            model = FluxTransformer2DModel(**FLUX_DEV)
    finally:
        torch.set_default_dtype(default_dtype)
    model.requires_grad_(False)
    add_trainable_lora(model, family, rank=16, alpha=16, dropout=0.0, lora_layers=None, seed=0)
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    objective = family.training_objective({"scheduler": scheduler}, LossSettings.from_config())
    return objective, model


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "grad-ckpt"])
@pytest.mark.parametrize("resolution", [512, 1024])
def test_full_flux_lora_step(benchmark, bench_env, full_model, resolution, checkpointing):
    objective, model = full_model
    device = bench_env.device
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.train()
    optimizer = build_optimizer(trainable_params(model), TrainConfig(learning_rate=1e-4))
    side = resolution // 8
    latents = torch.randn(1, 16, side, side, device=device, dtype=torch.bfloat16)  # cached latents
    embeds = {"prompt_embeds": torch.randn(1, TEXT_TOKENS, 4096, device=device, dtype=torch.bfloat16),
              "pooled_prompt_embeds": torch.randn(1, 768, device=device, dtype=torch.bfloat16)}
    generator = torch.Generator(device).manual_seed(0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = objective.loss(model, latents, embeds, generator)
        loss.backward()
        optimizer.step()
        sync(device)

    benchmark.group = f"full-flux-{resolution}px"
    benchmark.extra_info.update(case=f"full_flux_{resolution}", variant="grad-ckpt" if checkpointing else "no-ckpt",
                                resolution=resolution, **versions())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        step()  # one step alone for the peak memory
    except torch.cuda.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        pytest.skip(f"out of memory at {resolution}px without checkpointing")
    benchmark.extra_info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    benchmark.extra_info["memory_method"] = "cuda max_memory_allocated"
    benchmark.pedantic(step, rounds=5, warmup_rounds=2, iterations=1)
    flops = step_flops(model, (side // 2) ** 2)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(step_tflop=flops / 1e12, mfu=flops / median / _peak_flops(),
                                params_b=sum(p.numel() for p in model.parameters()) / 1e9)
    optimizer.state.clear()  # the next parametrization starts with fresh moments
    torch.cuda.empty_cache()
