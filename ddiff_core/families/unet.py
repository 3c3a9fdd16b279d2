"""UNet families: Stable Diffusion 1.x and SDXL. Epsilon or v-prediction, optional Min-SNR weighting, noise offset."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddiff_core.config import LossSettings
from ddiff_core.families.base import ModelFamily, TrainingObjective
from ddiff_core.speed import to_device

_UNET_ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]


class UNetFamily(ModelFamily):
    """What SD1.5 and SDXL share: DDPM noising, epsilon/v targets, scale-only latents, CFG validation."""

    denoiser_name = "unet"
    lora_presets = {
        "attention": _UNET_ATTENTION,  # what the upstream UNet LoRA examples target
        "attention-ff": _UNET_ATTENTION + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    }
    default_lora_preset = "attention"
    noise_prediction = True
    bucket_multiple = 64  # the UNets halve the latent 2 (SDXL) or 3 (SD1.5) times
    uses_cfg = True
    kohya_prefix = "unet"

    def training_objective(self, components, settings):
        return NoisePredictionObjective(self, components, settings)

    def added_conditioning(self, embeds, latents, conditioning, vae_scale: int) -> dict:
        """Extra keyword arguments of the UNet's forward (SDXL's micro-conditioning); none by default."""
        return {}


class NoisePredictionObjective(TrainingObjective):
    """One run's DDPM loss: its own scheduler copy, epsilon or v target, optional Min-SNR weighting, noise offset."""

    def __init__(self, family: UNetFamily, components, settings: LossSettings):
        from diffusers import DDPMScheduler

        self.family, self.settings = family, settings
        # A private DDPM copy: the pipeline's own scheduler may be any sampler, and validation changes its state.
        self.scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        vae = components.get("vae")
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.prediction_type = settings.prediction_type or self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    def loss(self, denoiser, latents, embeds, generator, conditioning=None):
        from diffusers.training_utils import compute_snr

        scheduler, settings = self.scheduler, self.settings
        bsz, device, dtype = latents.shape[0], latents.device, latents.dtype
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=dtype)
        if settings.noise_offset:
            offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=generator, device=device, dtype=dtype)
            noise = noise + settings.noise_offset * offset
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=generator,
                                  device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        extra = self.family.added_conditioning(embeds, latents, conditioning, self.vae_scale)
        pred = denoiser(noisy, timesteps, embeds["prompt_embeds"].to(device, dtype), **extra, return_dict=False)[0]
        if not settings.snr_gamma:
            return F.mse_loss(pred.float(), target.float(), reduction="mean")
        # Min-SNR weighting (Hang et al. 2023), as the upstream examples compute it.
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, settings.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        weights = weights / (snr + 1) if self.prediction_type == "v_prediction" else weights / snr
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        return (loss * weights).mean()


class SD15Family(UNetFamily):
    name = "sd15"
    pipeline_class_names = ("StableDiffusionPipeline",)
    pipeline_class_path = "diffusers:StableDiffusionPipeline"
    text_encoder_names = ("text_encoder",)

    def assemble_pipeline(self, components):
        return self.pipeline_class(**{**components, "safety_checker": None, "feature_extractor": None,
                                      "requires_safety_checker": False})

    def load_pipeline(self, path, **kwargs):
        return self.pipeline_class.from_pretrained(path, safety_checker=None, requires_safety_checker=False, **kwargs)

    def load_components(self, path, **kw):
        components = super().load_components(path, **kw)
        components.pop("requires_safety_checker", None)
        return components

    def encode_prompts(self, components, prompts, *, device, max_sequence_length):
        pipe = self.pipeline_class(vae=None, text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
                                   unet=None, scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
        with torch.no_grad():
            prompt_embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return {"prompt_embeds": prompt_embeds}


class SDXLFamily(UNetFamily):
    name = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    pipeline_class_path = "diffusers:StableDiffusionXLPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def encode_prompts(self, components, prompts, *, device, max_sequence_length):
        text = {k: components[k] for k in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
        pipe = self.pipeline_class(vae=None, unet=None, scheduler=None, **text)
        with torch.no_grad():
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=False)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def pipeline_settings(self, pipeline):
        return {"force_zeros_for_empty_prompt": pipeline.config.force_zeros_for_empty_prompt}

    def unconditional_embeds(self, components, embeds, *, device, max_sequence_length):
        # SDXL's pipelines ship with force_zeros_for_empty_prompt: without a negative prompt they guide away from
        # zeros, not from the encoded empty prompt.
        if components.get("force_zeros_for_empty_prompt", True):
            return {k: torch.zeros_like(v) for k, v in embeds.items()}
        return super().unconditional_embeds(components, embeds, device=device, max_sequence_length=max_sequence_length)

    def added_conditioning(self, embeds, latents, conditioning, vae_scale):
        # Micro-conditioning on (original size, crop top-left, target size), as SDXL was trained: each image's real
        # size before resizing and where its crop starts in the resized image, in pixels.
        bsz, device, dtype = latents.shape[0], latents.device, latents.dtype
        target = torch.tensor([latents.shape[-2] * vae_scale, latents.shape[-1] * vae_scale])
        if conditioning is None:  # no geometry given: the image is the target, uncropped
            original, crop = target.expand(bsz, 2), torch.zeros(bsz, 2)
        else:
            original, crop = conditioning["original_size"], conditioning["crop_top_left"]
        time_ids = torch.cat([original.float(), crop.float(), target.float().expand(bsz, 2)], dim=1)
        return {"added_cond_kwargs": {"text_embeds": embeds["pooled_prompt_embeds"].to(device, dtype),
                                      "time_ids": to_device(time_ids, device).to(dtype)}}
