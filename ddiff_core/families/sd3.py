"""Stable Diffusion 3 / 3.5: three text encoders (CLIP-L, CLIP-G, T5), unpacked 16-channel latents, rectified flow."""

from __future__ import annotations

import torch

from ddiff_core.families.base import ModelFamily
from ddiff_core.families.flow_matching import FlowMatchingSampler, flow_matching_loss, noisy_latents

_ATTENTION = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"]


class SD3Family(ModelFamily):
    name = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    pipeline_class_path = "diffusers:StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_presets = {
        "attention": _ATTENTION,  # upstream's SD3 default
        "all-blocks": _ATTENTION + ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
    }
    default_lora_preset = "attention"
    resolution_multiple = 16  # 8x VAE, then 2x2 patches
    uses_cfg = True

    def __init__(self):
        self._sampler: FlowMatchingSampler | None = None

    def prepare_training(self, components) -> None:
        self._sampler = FlowMatchingSampler(components["scheduler"].config)

    def prompt_kwargs(self, max_sequence_length):
        return {"max_sequence_length": max_sequence_length}

    def encode_prompts(self, components, prompts, *, device, max_sequence_length):
        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
        pipe = self.pipeline_class(transformer=None, scheduler=None, vae=None, **{k: components[k] for k in names})
        with torch.no_grad():
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device,
                                                             do_classifier_free_guidance=False,
                                                             max_sequence_length=max_sequence_length)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def training_loss(self, denoiser, latents, embeds, generator, config, conditioning=None):
        if self._sampler is None:
            raise RuntimeError("call prepare_training(components) before training_loss")
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps, sigmas = self._sampler.sample(latents.shape[0], generator, config)
        pred = denoiser(
            hidden_states=noisy_latents(latents, noise, sigmas),
            timestep=timesteps,
            encoder_hidden_states=embeds["prompt_embeds"].to(latents.device, latents.dtype),
            pooled_projections=embeds["pooled_prompt_embeds"].to(latents.device, latents.dtype),
            return_dict=False,
        )[0]
        # The velocity target (noise - latents); upstream's --precondition_outputs variant is the same
        # objective up to a per-sample sigma^2 weight.
        return flow_matching_loss(pred, latents, noise, sigmas, config.weighting_scheme)

    def build_tiny(self, size="tiny", seed=0, variant=None):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import T5Config, T5EncoderModel

        from ddiff_core.families.unet import _tiny_clip
        from ddiff_core.tokenizers import build_clip_tokenizer, build_t5_tokenizer

        clip = 32
        tokenizer, tokenizer_2, tokenizer_3 = build_clip_tokenizer(), build_clip_tokenizer(), build_t5_tokenizer()
        torch.manual_seed(seed)
        # joint_attention_dim (the T5 width) must be at least the two CLIP widths together, and the pooled
        # projection their two projection sizes together.
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2 if size == "tiny" else 6,
            attention_head_dim=8 if size == "tiny" else 64, num_attention_heads=4, joint_attention_dim=2 * clip,
            caption_projection_dim=32 if size == "tiny" else 256, pooled_projection_dim=2 * clip, pos_embed_max_size=64,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 32, 32),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=1.5305,
                            shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        torch.manual_seed(seed + 2)
        text_encoder = _tiny_clip(tokenizer, clip, projection=True)
        torch.manual_seed(seed + 3)
        text_encoder_2 = _tiny_clip(tokenizer_2, clip, projection=True)
        torch.manual_seed(seed + 4)
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=2 * clip, d_kv=8, d_ff=4 * clip,
                                                 num_layers=2, num_heads=4, decoder_start_token_id=0,
                                                 pad_token_id=tokenizer_3.pad_token_id,
                                                 eos_token_id=tokenizer_3.eos_token_id))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                                        tokenizer_3=tokenizer_3)
