"""Tiny random-weight pipelines of the built-in families, built offline (tests, benchmarks, the demo).

    python -m ddiff_core.tiny --family flux --output_dir models/tiny-flux [--size tiny|small] [--seed 0]
    python -m ddiff_core.tiny --captioner --output_dir models/tiny-vlm     # a tiny vision-language captioner

Builders live here, not on the family plugins: a third-party family needs none to train on a real model folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def tiny_vae(*, latent_channels: int, scaling_factor: float, shift_factor: float | None = None,
             channels: tuple[int, ...] = (8, 16, 32, 32), quant_conv: bool = True):
    """A small AutoencoderKL (8x downsampling with four blocks) with a family's latent constants."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), layers_per_block=1, norm_num_groups=8,
                         sample_size=64, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=quant_conv, use_post_quant_conv=quant_conv)


def tiny_clip(tokenizer, hidden: int, projection: bool = False):
    """A two-layer CLIP text encoder over ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_t5(tokenizer, width: int, d_kv: int, d_ff: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=d_kv, d_ff=d_ff, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id))


# FLUX shapes. "small" is ~18M transformer parameters, for benchmarks.
_FLUX_SIZES = {
    "tiny": dict(layers=2, single=2, heads=2, head_dim=16, rope=(4, 6, 6), text=32, vae=(8, 16, 32, 32)),
    "small": dict(layers=4, single=8, heads=4, head_dim=64, rope=(8, 28, 28), text=64, vae=(16, 32, 64, 64)),
}


def build_flux(size: str = "tiny", seed: int = 0, variant: str | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from ddiff_core.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    s = _FLUX_SIZES[size]
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        in_channels=64, num_layers=s["layers"], num_single_layers=s["single"], attention_head_dim=s["head_dim"],
        num_attention_heads=s["heads"], joint_attention_dim=s["text"],  # = T5 d_model
        pooled_projection_dim=s["text"],  # = CLIP hidden size
        guidance_embeds=variant != "schnell",  # schnell is timestep-distilled: no guidance embedding
        axes_dims_rope=s["rope"],
    )
    torch.manual_seed(seed + 1)
    vae = tiny_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, channels=s["vae"], quant_conv=False)
    torch.manual_seed(seed + 2)
    text_encoder = tiny_clip(tokenizer, s["text"])
    torch.manual_seed(seed + 3)
    text_encoder_2 = tiny_t5(tokenizer_2, s["text"], d_kv=s["text"] // 4, d_ff=2 * s["text"])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def build_sd3(size: str = "tiny", seed: int = 0, variant: str | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

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
    vae = tiny_vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False)
    torch.manual_seed(seed + 2)
    text_encoder = tiny_clip(tokenizer, clip, projection=True)
    torch.manual_seed(seed + 3)
    text_encoder_2 = tiny_clip(tokenizer_2, clip, projection=True)
    torch.manual_seed(seed + 4)
    text_encoder_3 = tiny_t5(tokenizer_3, 2 * clip, d_kv=8, d_ff=4 * clip)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


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


def build_sd15(size: str = "tiny", seed: int = 0, variant: str | None = None):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from ddiff_core.tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    unet = _tiny_unet(size, cross_attention_dim=32)
    torch.manual_seed(seed + 1)
    vae = tiny_vae(latent_channels=4, scaling_factor=0.18215)
    torch.manual_seed(seed + 2)
    text_encoder = tiny_clip(tokenizer, 32)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="epsilon")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_sdxl(size: str = "tiny", seed: int = 0, variant: str | None = None):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from ddiff_core.tokenizers import build_clip_tokenizer

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer()
    torch.manual_seed(seed)
    # addition_time_embed_dim 8: the added embedding takes 6 time ids x 8 + text_encoder_2's projection (32).
    unet = _tiny_unet(size, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1)
    torch.manual_seed(seed + 1)
    vae = tiny_vae(latent_channels=4, scaling_factor=0.13025)
    torch.manual_seed(seed + 2)
    text_encoder = tiny_clip(tokenizer, 32)
    torch.manual_seed(seed + 3)
    text_encoder_2 = tiny_clip(tokenizer_2, 32, projection=True)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


# family name -> (builder, its variants)
TINY_BUILDERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "flux": (build_flux, ("dev", "schnell")),
    "sd3": (build_sd3, ()),
    "sd15": (build_sd15, ()),
    "sdxl": (build_sdxl, ()),
}


def build_tiny_pipeline(family: str, size: str = "tiny", seed: int = 0, variant: str | None = None):
    """A random-weight pipeline of ``family``; the same seed gives the same weights.

    Raises:
        ValueError: no tiny builder for ``family``, or an unknown variant.
    """
    if family not in TINY_BUILDERS:
        raise ValueError(f"no tiny builder for {family!r}; built-in: {', '.join(TINY_BUILDERS)}")
    build, variants = TINY_BUILDERS[family]
    if variant and variant not in variants:
        raise ValueError(f"--variant {variant} is not one of {variants or 'none'} for {family}")
    return build(size=size, seed=seed, variant=variant)


def save_tiny_pipeline(family: str, output_dir: str | Path, size: str = "tiny", seed: int = 0,
                       variant: str | None = None) -> Path:
    """Builds and saves with ``save_pretrained`` so the family's stock pipeline ``from_pretrained`` loads it."""
    output_dir = Path(output_dir)
    build_tiny_pipeline(family, size, seed, variant).save_pretrained(output_dir)
    return output_dir


def save_tiny_lora(family: str, denoiser, output_dir: str | Path, *, seed: int = 0, rank: int = 4,
                   std: float = 0.5, trigger: str | None = None, base_model: str = "tiny") -> Path:
    """A random LoRA (non-zero B, so it changes the output) on ``denoiser``, saved in ddiff's output layout
    (weights + model card); the adapter is removed again afterwards."""
    from ddiff_core.families import get_family
    from ddiff_core.lora import add_lora, save_lora, write_model_card

    fam = get_family(family)
    torch.manual_seed(seed)
    config = add_lora(denoiser, fam, rank=rank, alpha=rank, dropout=0.0, lora_layers=None)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    save_lora(output_dir, fam, denoiser, config)
    write_model_card(output_dir, family=fam, base_model=base_model, trigger=trigger, config_dict={},
                     lora_config=config, global_step=0)
    denoiser.delete_adapters("default")
    return Path(output_dir)


def save_tiny_clip_model(output_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight CLIP (text and vision towers, 32 px images) with its tokenizer and image processor, for
    ``scripts/evaluate.py --clip_model`` offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from ddiff_core.tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddiff_core.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="flux", choices=sorted(TINY_BUILDERS))
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", default=None, help="a family's variant, e.g. flux: schnell (no guidance embedding)")
    parser.add_argument("--captioner", action="store_true", help="build the tiny vision-language captioner instead")
    parser.add_argument("--clip", action="store_true", help="build a tiny CLIP model (for scripts/evaluate.py) instead")
    args = parser.parse_args(argv)
    if args.clip:
        print(f"saved a random-weight CLIP model to {save_tiny_clip_model(args.output_dir, args.seed)}")
        return 0
    if args.captioner:
        from ddiff_core.captioning.vlm import VisionLanguageCaptioner

        print(f"saved a random-weight captioner to {VisionLanguageCaptioner.build_tiny(args.output_dir, args.seed)}")
        return 0
    try:
        path = save_tiny_pipeline(args.family, args.output_dir, args.size, args.seed, args.variant)
    except ValueError as err:
        parser.error(str(err))
    print(f"saved a {args.size} random-weight {args.family} pipeline to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
