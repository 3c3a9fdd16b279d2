"""UNet families: Stable Diffusion 1.x and SDXL. Epsilon or v-prediction, optional Min-SNR weighting, noise offset."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddiff_core.families.base import ModelFamily

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
    uses_cfg = True
    kohya_prefix = "unet"

    def __init__(self):
        self._scheduler = None
        self._vae_scale = 8

    def prepare_training(self, components) -> None:
        from diffusers import DDPMScheduler

        # A private DDPM copy: the pipeline's own scheduler may be any sampler, and validation changes its state.
        self._scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        vae_config = components["vae"].config if components.get("vae") is not None else None
        if vae_config is not None:
            self._vae_scale = 2 ** (len(vae_config.block_out_channels) - 1)

    def _conditioning(self, embeds, latents, conditioning) -> dict:
        return {}

    def training_loss(self, denoiser, latents, embeds, generator, config, conditioning=None):
        from diffusers.training_utils import compute_snr

        if self._scheduler is None:
            raise RuntimeError("call prepare_training(components) before training_loss")
        scheduler = self._scheduler
        bsz, device, dtype = latents.shape[0], latents.device, latents.dtype
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=dtype)
        if getattr(config, "noise_offset", 0.0):
            offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=generator, device=device, dtype=dtype)
            noise = noise + config.noise_offset * offset
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=generator,
                                  device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction_type = getattr(config, "prediction_type", None) or scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction type {prediction_type!r}")
        pred = denoiser(noisy, timesteps, embeds["prompt_embeds"].to(device, dtype),
                        **self._conditioning(embeds, latents, conditioning), return_dict=False)[0]
        snr_gamma = getattr(config, "snr_gamma", None)
        if not snr_gamma:
            return F.mse_loss(pred.float(), target.float(), reduction="mean")
        # Min-SNR weighting (Hang et al. 2023), as the upstream examples compute it.
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        weights = weights / (snr + 1) if prediction_type == "v_prediction" else weights / snr
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        return (loss * weights).mean()


def _tiny_unet(size: str, cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    channels = (32, 64) if size == "tiny" else (64, 128, 256)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1 if size == "tiny" else 2,
        block_out_channels=channels, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, **extra,
    )


def _tiny_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor)


def _tiny_clip(tokenizer, hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


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

    def build_tiny(self, size="tiny", seed=0, variant=None):
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        from ddiff_core.tokenizers import build_clip_tokenizer

        tokenizer = build_clip_tokenizer()
        torch.manual_seed(seed)
        unet = _tiny_unet(size, cross_attention_dim=32)
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(0.18215)
        torch.manual_seed(seed + 2)
        text_encoder = _tiny_clip(tokenizer, 32)
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type="epsilon")
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


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

    def _conditioning(self, embeds, latents, conditioning):
        # Micro-conditioning on (original size, crop top-left, target size), as SDXL was trained: each image's real
        # size before resizing and where its crop starts in the resized image, in pixels.
        bsz, device, dtype = latents.shape[0], latents.device, latents.dtype
        target = torch.tensor([latents.shape[-2] * self._vae_scale, latents.shape[-1] * self._vae_scale])
        if conditioning is None:  # no geometry given: the image is the target, uncropped
            original, crop = target.expand(bsz, 2), torch.zeros(bsz, 2)
        else:
            original, crop = conditioning["original_size"], conditioning["crop_top_left"]
        time_ids = torch.cat([original.float(), crop.float(), target.float().expand(bsz, 2)], dim=1)
        return {"added_cond_kwargs": {"text_embeds": embeds["pooled_prompt_embeds"].to(device, dtype),
                                      "time_ids": time_ids.to(device, dtype)}}

    def build_tiny(self, size="tiny", seed=0, variant=None):
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        from ddiff_core.tokenizers import build_clip_tokenizer

        tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer()
        torch.manual_seed(seed)
        # addition_time_embed_dim 8: the added embedding takes 6 time ids x 8 + text_encoder_2's projection (32).
        unet = _tiny_unet(size, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1)
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(0.13025)
        torch.manual_seed(seed + 2)
        text_encoder = _tiny_clip(tokenizer, 32)
        torch.manual_seed(seed + 3)
        text_encoder_2 = _tiny_clip(tokenizer_2, 32, projection=True)
        scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
