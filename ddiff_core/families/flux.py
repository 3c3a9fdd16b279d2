"""FLUX.1 (dev, Krea-dev, schnell): CLIP + T5 prompts, 2x2-packed latents, rectified flow."""

from __future__ import annotations

from typing import Any

import torch

from ddiff_core.families.base import ModelFamily
from ddiff_core.families.flow_matching import FlowMatchingSampler, flow_matching_loss, noisy_latents

_DOUBLE = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
_SINGLE = r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"

# Tiny builders' shapes. "small" is ~20M transformer parameters, for benchmarks.
_SIZES = {
    "tiny": dict(layers=2, single=2, heads=2, head_dim=16, rope=(4, 6, 6), text=32, vae=(8, 16, 32, 32)),
    "small": dict(layers=4, single=8, heads=4, head_dim=64, rope=(8, 28, 28), text=64, vae=(16, 32, 64, 64)),
}


class FluxFamily(ModelFamily):
    name = "flux"
    pipeline_class_names = ("FluxPipeline",)
    pipeline_class_path = "diffusers:FluxPipeline"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    lora_presets = {
        # What train_dreambooth_lora_flux.py targets by default: the single blocks' MLP is left out.
        "upstream": [
            "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
            "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        ],  # fmt: skip
        "attention": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"],
        # Every linear layer of every block, single blocks' proj_mlp/proj_out included
        # (a full-match regex, so the model's final top-level proj_out is not adapted).
        "all-blocks": f"({_DOUBLE}|{_SINGLE})",
    }
    default_lora_preset = "all-blocks"
    resolution_multiple = 16  # 8x VAE downsampling, then 2x2 packing

    def __init__(self):
        self._sampler: FlowMatchingSampler | None = None

    def prompt_kwargs(self, max_sequence_length):
        return {"max_sequence_length": max_sequence_length}

    def encode_prompts(self, components, prompts, *, device, max_sequence_length):
        # The pipeline's own encoder, over the text components alone: same tokenization as inference.
        text_only = {k: v for k, v in components.items() if k in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
        pipe = self.pipeline_class(scheduler=None, vae=None, transformer=None, **text_only)
        with torch.no_grad():
            prompt_embeds, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=prompts, device=device, max_sequence_length=max_sequence_length
            )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def training_loss(self, denoiser, latents, embeds, generator, config, conditioning=None):
        from diffusers import FluxPipeline

        if self._sampler is None:
            raise RuntimeError("call prepare_training(components) before training_loss")
        bsz, channels, height, width = latents.shape
        device, dtype = latents.device, latents.dtype
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=dtype)
        timesteps, sigmas = self._sampler.sample(bsz, generator, config)
        noisy = noisy_latents(latents, noise, sigmas)
        packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, device, dtype)
        prompt_embeds = embeds["prompt_embeds"].to(device, dtype)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if getattr(denoiser, "module", denoiser).config.guidance_embeds:  # dev/Krea yes, schnell no
            guidance = torch.full((bsz,), config.guidance_scale, device=device, dtype=dtype)
        pred = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(dtype) / 1000,
            guidance=guidance,
            pooled_projections=embeds["pooled_prompt_embeds"].to(device, dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        # Unpack with a scale factor of 1: height/width here are already latent sizes.
        pred = FluxPipeline._unpack_latents(pred, height, width, 1)
        return flow_matching_loss(pred, latents, noise, sigmas, config.weighting_scheme)

    def decode_pipeline_latents(self, pipeline, latents, height, width):
        from diffusers import FluxPipeline

        latents = FluxPipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
        return self.decode_latents(pipeline.vae, latents)

    def prepare_training(self, components: dict[str, Any]) -> None:
        """Builds the timestep grid from the scheduler config (once per run)."""
        self._sampler = FlowMatchingSampler(components["scheduler"].config)

    tiny_variants = ("dev", "schnell")

    def build_tiny(self, size="tiny", seed=0, variant=None):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from ddiff_core.tokenizers import build_clip_tokenizer, build_t5_tokenizer

        s = _SIZES[size]
        tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            in_channels=64,
            num_layers=s["layers"],
            num_single_layers=s["single"],
            attention_head_dim=s["head_dim"],
            num_attention_heads=s["heads"],
            joint_attention_dim=s["text"],  # = T5 d_model
            pooled_projection_dim=s["text"],  # = CLIP hidden size
            guidance_embeds=variant != "schnell",  # schnell is timestep-distilled: no guidance embedding
            axes_dims_rope=s["rope"],
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(s["vae"]),
            up_block_types=("UpDecoderBlock2D",) * len(s["vae"]),
            block_out_channels=s["vae"],
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.3611,  # FLUX.1's VAE constants
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=s["text"],
                intermediate_size=2 * s["text"],
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=s["text"],
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        torch.manual_seed(seed + 3)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=s["text"],
                d_kv=s["text"] // 4,
                d_ff=2 * s["text"],
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
            )
        )
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        )
        return FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
