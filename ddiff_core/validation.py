"""Validation images from the components already in memory: one pipeline, assembled once, batched, seeded.

No ``from_pretrained`` during training; the prompts are encoded once at start-up (so the text encoders can be
freed); every validation uses the same seeds, so grids are comparable across steps; the training state (mode,
adapter, RNG) is exactly as it was afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddiff_core.atomic import atomic_write

logger = logging.getLogger(__name__)


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Images in a grid, one list per row."""
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    return grid


def _to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    array = (pixels.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def _save_atomic(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


class ValidationRunner:
    """Generates ``num_images`` images per prompt in one pipeline call, from in-memory components."""

    def __init__(self, family, components: dict, denoiser, prompts: list[str], *, num_images: int, seed: int,
                 resolution: int | tuple[int, int] | list[tuple[int, int]], num_inference_steps: int,
                 guidance_scale: float, max_sequence_length: int, output_dir: Path, device, dtype: torch.dtype):
        self.family, self.prompts, self.num_images = family, prompts, num_images
        # One or more (height, width) frames: a grid per frame, so it shows the aspect the LoRA learnt.
        if isinstance(resolution, int):
            resolution = [(resolution, resolution)]
        self.sizes = [resolution] if isinstance(resolution, tuple) else list(resolution)
        self.steps, self.guidance = num_inference_steps, guidance_scale
        self.output_dir, self.device, self.dtype = Path(output_dir), torch.device(device), dtype
        self.seeds = [seed + i for i in range(len(prompts) * num_images)]
        self.denoiser = denoiser
        # Encoded once: the text encoders may be freed after this, as the caches allow.
        embeds = family.validation_embeds(components, prompts, device=self.device, max_sequence_length=max_sequence_length)
        self.embeds = {k: v.repeat_interleave(num_images, dim=0).to(self.device, dtype) for k, v in embeds.items()}
        # One pipeline over the very modules that train: no load, no copy. Text encoders are not needed.
        parts = dict(components)
        parts[family.denoiser_name] = denoiser
        for name in family.text_encoder_names:
            parts[name] = None
        self.pipeline = family.assemble_pipeline(parts)
        self.pipeline.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def generate(self, *, lora: bool = True, batched: bool = True, size: tuple[int, int] | None = None) -> list[Image.Image]:
        """All images of one validation: batched in a single call, or one call per image (for comparison).

        Runs in eval mode without gradients and restores train mode, the adapter and every RNG afterwards.
        """
        was_training = self.denoiser.training
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.denoiser.eval()
            if not lora:
                self.denoiser.disable_adapters()
            try:
                size = size or self.sizes[0]
                if batched:
                    pixels = self._call(self.embeds, self.seeds, size)
                else:
                    pixels = torch.cat([self._call({k: v[i : i + 1] for k, v in self.embeds.items()}, [seed], size)
                                        for i, seed in enumerate(self.seeds)])
            finally:
                if not lora:
                    self.denoiser.enable_adapters()
                self.denoiser.train(was_training)
        return _to_pil(pixels)

    def _call(self, embeds: dict, seeds: list[int], size: tuple[int, int]) -> torch.Tensor:
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        height, width = size
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            latents = self.pipeline(
                **embeds, height=height, width=width, num_inference_steps=self.steps,
                guidance_scale=self.guidance, generator=generators, output_type="latent",
            ).images
        # Outside autocast: a VAE kept in fp32 because it overflows in fp16 (force_upcast) decodes in fp32.
        return self.family.decode_pipeline_latents(self.pipeline, latents, height, width)

    def _rows(self, images: list[Image.Image]) -> list[list[Image.Image]]:
        n = self.num_images
        return [images[i * n : (i + 1) * n] for i in range(len(self.prompts))]

    def run(self, step: int, trackers=()) -> list[Path]:
        """One validation: writes ``validation/step-<step>.png`` (a row per prompt; with several frames one grid each,
        ``step-<step>-<H>x<W>.png``) and logs it."""
        paths = []
        for size in self.sizes:
            images = self.generate(size=size)
            suffix = "" if len(self.sizes) == 1 else f"-{size[0]}x{size[1]}"
            path = self.output_dir / "validation" / f"step-{step:06d}{suffix}.png"
            paths.append(path)
            _save_atomic(image_grid(self._rows(images)), path)
            stacked = np.stack([np.asarray(i) for i in images])
            for tracker in trackers:
                if hasattr(tracker, "log_images"):
                    tracker.log_images({f"validation{suffix}": stacked}, step=step, dataformats="NHWC")
            logger.info("validation images at step %d: %s", step, path)
        return paths

    def final_comparison(self) -> list[Path]:
        """Base (adapter off) and LoRA side by side for the same prompts and seeds, one file per frame:
        ``validation/final-base-vs-lora.png`` (``-<H>x<W>`` added with several frames)."""
        paths = []
        for size in self.sizes:
            base, lora = self._rows(self.generate(lora=False, size=size)), self._rows(self.generate(size=size))
            suffix = "" if len(self.sizes) == 1 else f"-{size[0]}x{size[1]}"
            path = self.output_dir / "validation" / f"final-base-vs-lora{suffix}.png"
            _save_atomic(image_grid([b + l for b, l in zip(base, lora)]), path)
            paths.append(path)
        return paths
