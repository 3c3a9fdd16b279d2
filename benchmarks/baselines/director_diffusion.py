"""Small, faithful re-creations of director-diffusion's "before" code paths (see shared efficiency-report.md).

They exist only to be measured against ddiff's versions; the library never imports them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ddiff_core.latents import sample_latents


def compute_loss_inline_scaling(objective, transformer, vae, latent_params, embeds, generator, weight_dtype, autocast):
    """src/train.py compute_loss: the VAE shift/scale read from the config and applied inline (in two code
    paths; the one for this batch runs), instead of one normalization helper."""
    model_input = sample_latents(latent_params, generator)
    if latent_params is not None:  # path 1 (cached latents)
        vae_config_shift_factor = vae.config.shift_factor
        vae_config_scaling_factor = vae.config.scaling_factor
        model_input = (model_input - vae_config_shift_factor) * vae_config_scaling_factor
    else:  # path 2 (fresh latents): identical copy
        vae_config_shift_factor = vae.config.shift_factor
        vae_config_scaling_factor = vae.config.scaling_factor
        model_input = (model_input - vae_config_shift_factor) * vae_config_scaling_factor
    embeds = {k: v.to(weight_dtype) for k, v in embeds.items()}
    with autocast:
        return objective.loss(transformer, model_input.to(weight_dtype), embeds, generator)


def validation_with_reload(family, model_dir, denoiser, prompt_embeds: dict, seeds, resolution, steps, dtype):
    """src/train.py validation: a new pipeline from_pretrained (around the training transformer) at every validation."""
    pipeline = family.load_pipeline(str(model_dir), dtype=dtype, **{family.denoiser_name: denoiser}).to(denoiser.device)
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator(pipeline.device).manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipeline(**prompt_embeds, height=resolution, width=resolution, num_inference_steps=steps,
                        generator=generators, output_type="pt").images


def validation_one_by_one(pipeline, prompt_embeds: dict, seeds, resolution, steps):
    """src/train.py validation loop: one pipeline call per image."""
    images = []
    with torch.no_grad():
        for i, seed in enumerate(seeds):
            one = {k: v[i : i + 1] for k, v in prompt_embeds.items()}
            images.append(pipeline(**one, height=resolution, width=resolution, num_inference_steps=steps,
                                   generator=torch.Generator(pipeline.device).manual_seed(seed), output_type="pt").images)
    return images


class TwoPipelineServer:
    """src/serve.py: a base pipeline plus a second, LoRA-loaded pipeline per style (full copies of the weights)."""

    def __init__(self, family, model_dir, lora_dirs: dict[str, Path], dtype):
        self.base = family.load_pipeline(str(model_dir), dtype=dtype)
        self.styled = {}
        for name, path in lora_dirs.items():
            pipe = family.load_pipeline(str(model_dir), dtype=dtype)
            pipe.load_lora_weights(str(path))
            self.styled[name] = pipe
        for pipe in [self.base, *self.styled.values()]:
            pipe.set_progress_bar_config(disable=True)

    def pipeline_for(self, name: str | None):
        return self.base if name is None else self.styled[name]


def get_lora_options(lora_dir: Path) -> list[str]:
    """src/serve.py get_lora_options: the folder listed (and each card read) on every call, with append loops."""
    options = []
    for name in sorted(os.listdir(lora_dir)):
        path = Path(lora_dir) / name
        if (path / "pytorch_lora_weights.safetensors").is_file():
            card = path / "README.md"
            _ = card.read_text() if card.is_file() else ""
            options.append(name)
    return options
