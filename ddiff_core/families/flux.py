"""FLUX.1 (dev, Krea-dev, schnell): CLIP + T5 prompts, 2x2-packed latents, rectified flow."""

from __future__ import annotations

import functools

import torch

from ddiff_core.families.flow_matching import ATTENTION_TARGETS, DOUBLE_STREAM_TARGETS, FlowMatchingFamily

# The single-stream blocks' linear layers; the top-level proj_out is not one of them (a full-match regex below).
_SINGLE = r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"
_DOUBLE = r"transformer_blocks\.\d+\.(" + "|".join(t.replace(".", r"\.") for t in DOUBLE_STREAM_TARGETS) + ")"


@functools.lru_cache(maxsize=32)
def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The packed latents' position ids, made once per frame, device and dtype: the pipeline's helper builds them on
    the host and copies them over, which would make the host wait for the GPU at every micro-batch. Read-only."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, height, width, device, dtype)


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    pipeline_class_names = ("FluxPipeline",)
    pipeline_class_path = "diffusers:FluxPipeline"
    denoiser_name = "transformer"
    attention_backends = True
    text_encoder_names = ("text_encoder", "text_encoder_2")
    lora_presets = {
        "upstream": DOUBLE_STREAM_TARGETS,  # train_dreambooth_lora_flux.py's default: the single blocks' MLP left out
        "attention": ATTENTION_TARGETS,
        # Every linear layer of every block, single blocks' proj_mlp/proj_out included.
        "all-blocks": f"({_DOUBLE}|{_SINGLE})",
    }
    default_lora_preset = "all-blocks"

    def encode_prompts(self, components, prompts, *, device, max_sequence_length):
        # The pipeline's own encoder, over the text components alone: same tokenization as inference.
        text_only = {k: v for k, v in components.items() if k in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
        pipe = self.pipeline_class(scheduler=None, vae=None, transformer=None, **text_only)
        with torch.no_grad():
            prompt_embeds, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=prompts, device=device, max_sequence_length=max_sequence_length
            )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def predict_velocity(self, denoiser, noisy, timesteps, embeds, settings):
        from diffusers import FluxPipeline

        bsz, channels, height, width = noisy.shape
        device, dtype = noisy.device, noisy.dtype
        packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)
        image_ids = latent_image_ids(height // 2, width // 2, device, dtype)
        prompt_embeds = embeds["prompt_embeds"].to(device, dtype)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if getattr(denoiser, "module", denoiser).config.guidance_embeds:  # dev/Krea yes, schnell no
            guidance = torch.full((bsz,), settings.guidance_scale, device=device, dtype=dtype)
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
        return FluxPipeline._unpack_latents(pred, height, width, 1)

    def decode_pipeline_latents(self, pipeline, latents, height, width):
        from diffusers import FluxPipeline

        latents = FluxPipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
        return self.decode_latents(pipeline.vae, latents)
