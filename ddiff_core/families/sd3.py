"""Stable Diffusion 3 / 3.5: three text encoders (CLIP-L, CLIP-G, T5), unpacked 16-channel latents, rectified flow."""

from __future__ import annotations

import torch

from ddiff_core.families.flow_matching import ATTENTION_TARGETS, DOUBLE_STREAM_TARGETS, FlowMatchingFamily


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    pipeline_class_path = "diffusers:StableDiffusion3Pipeline"
    denoiser_name = "transformer"

    def repeated_block_classes(self, denoiser) -> tuple[str, ...]:
        return ("JointTransformerBlock",)  # diffusers 0.42 declares none for SD3
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_presets = {
        "attention": ATTENTION_TARGETS,  # upstream's SD3 default
        "all-blocks": DOUBLE_STREAM_TARGETS,
    }
    default_lora_preset = "attention"
    uses_cfg = True
    default_weighting_scheme = "logit_normal"  # SD3's own sampling, and upstream's SD3 script's default
    default_max_sequence_length = 256  # the SD3 pipeline's default

    def encode_prompts(self, components, prompts, *, device, max_sequence_length):
        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
        pipe = self.pipeline_class(transformer=None, scheduler=None, vae=None, **{k: components[k] for k in names})
        with torch.no_grad():
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device,
                                                             do_classifier_free_guidance=False,
                                                             max_sequence_length=max_sequence_length)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def predict_velocity(self, denoiser, noisy, timesteps, embeds, settings):
        # The velocity target (noise - latents); upstream's --precondition_outputs variant is the same
        # objective up to a per-sample sigma^2 weight.
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=embeds["prompt_embeds"].to(noisy.device, noisy.dtype),
            pooled_projections=embeds["pooled_prompt_embeds"].to(noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
