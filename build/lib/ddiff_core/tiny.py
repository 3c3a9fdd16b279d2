"""Builds tiny random-weight pipelines of any registered family, offline.

    python -m ddiff_core.tiny --family flux --output_dir models/tiny-flux [--size tiny|small] [--seed 0]
    python -m ddiff_core.tiny --captioner --output_dir models/tiny-vlm     # a tiny vision-language captioner
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddiff_core.families import available_families, get_family


def build_tiny_pipeline(family: str, size: str = "tiny", seed: int = 0, variant: str | None = None):
    """A random-weight pipeline of ``family``; the same seed gives the same weights."""
    return get_family(family).build_tiny(size=size, seed=seed, variant=variant)


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
    import torch

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddiff_core.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="flux", choices=available_families())
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", default=None, help="a family's variant, e.g. flux: schnell (no guidance embedding)")
    parser.add_argument("--captioner", action="store_true", help="build the tiny vision-language captioner instead")
    args = parser.parse_args(argv)
    if args.captioner:
        from ddiff_core.captioning.vlm import VisionLanguageCaptioner

        print(f"saved a random-weight captioner to {VisionLanguageCaptioner.build_tiny(args.output_dir, args.seed)}")
        return 0
    variants = get_family(args.family).tiny_variants
    if args.variant and args.variant not in variants:
        parser.error(f"--variant {args.variant} is not one of {variants or 'none'} for {args.family}")
    path = save_tiny_pipeline(args.family, args.output_dir, args.size, args.seed, args.variant)
    print(f"saved a {args.size} random-weight {args.family} pipeline to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
