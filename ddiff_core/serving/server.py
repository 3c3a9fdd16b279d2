"""The style server without a web framework: request checks, one pipeline with every LoRA as a named adapter, blind
pairs and votes. The Gradio page (``page.py``) sits on top and adds nothing but widgets.

Every request is checked here (not only by the widgets) before anything reaches the model, and generation is
serialised: the active adapter is pipeline-wide state.
"""

from __future__ import annotations

import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import PngImagePlugin

from ddiff_core.buckets import FRAME_RATIOS, aspect_ratio, bucket_for
from ddiff_core.serving.adapters import AdapterBank, LoraCatalog, LoraInfo
from ddiff_core.serving.votes import VoteStore

BASE = "(base model)"


class RequestError(ValueError):
    """A request the server refuses; the message says why, in one line."""


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 500
    min_steps: int = 1
    max_steps: int = 50
    sizes: tuple[int, ...] = (64, 128, 256, 512, 768, 1024)
    max_guidance: float = 20.0
    max_seed: int = 2**32 - 1
    max_work: int = 28 * 1024 * 1024  # steps x pixels of one image: 28 steps at 1024 px, 112 at 512 px
    # Frames a request may ask for (width:height); the image has about size² pixels in that frame.
    aspects: tuple[str, ...] = tuple(FRAME_RATIOS) + tuple(
        ":".join(reversed(name.split(":"))) for name in FRAME_RATIOS if name != "1:1")


def director_name(lora_name: str) -> str:
    """'nolan-style' -> 'Nolan'; 'wes_anderson' -> 'Wes Anderson'."""
    stem = re.sub(r"[-_ ]?(style|lora)$", "", lora_name, flags=re.IGNORECASE)
    return " ".join(part.capitalize() for part in re.split(r"[-_. ]+", stem) if part) or lora_name


def styled_prompts(prompt: str, info: LoraInfo) -> tuple[str, str]:
    """(LoRA prompt, base prompt): the trigger phrase added when absent; the base gets 'in the style of X' instead."""
    trigger = info.trigger
    lora_prompt = prompt if not trigger or trigger in prompt else f"{trigger} {prompt}"
    plain = " ".join(prompt.replace(trigger, " ").split()) if trigger else prompt
    return lora_prompt, f"{plain}, in the style of {director_name(info.name)}"


def check_request(lim: Limits, prompt, steps, size, guidance, seed=0, aspect="1:1") -> tuple[str, int, int, int, float, int]:
    """Coerces and bounds every generation parameter; returns (prompt, steps, height, width, guidance, seed).

    Raises:
        RequestError: before any model work, naming the parameter.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("the prompt is empty")
    if len(prompt) > lim.max_prompt_chars:
        raise RequestError(f"the prompt is {len(prompt)} characters; the limit is {lim.max_prompt_chars}")
    try:
        steps, size, seed, guidance = int(steps), int(size), int(seed), float(guidance)
    except (TypeError, ValueError, OverflowError) as err:
        raise RequestError("steps, size and seed must be whole numbers and guidance a number") from err
    if not lim.min_steps <= steps <= lim.max_steps:
        raise RequestError(f"steps must be between {lim.min_steps} and {lim.max_steps}, got {steps}")
    if size not in lim.sizes:
        raise RequestError(f"size {size} is not one of {', '.join(map(str, lim.sizes))}")
    if aspect not in lim.aspects:
        raise RequestError(f"aspect {str(aspect)[:20]!r} is not one of {', '.join(lim.aspects)}")
    frame = bucket_for(size, aspect_ratio(aspect), 16)  # 16: every family's pipeline takes such sides
    if steps * size * size > lim.max_work:  # charged at the nominal size²: every frame of a size costs the same
        raise RequestError(f"{steps} steps at {frame.height}x{frame.width} is more work than this server allows; "
                           "use fewer steps or a smaller size")
    if not 0.0 <= guidance <= lim.max_guidance:
        raise RequestError(f"guidance must be between 0 and {lim.max_guidance}, got {guidance}")
    if not 0 <= seed <= lim.max_seed:
        raise RequestError(f"seed must be between 0 and {lim.max_seed}, got {seed}")
    return prompt.strip(), steps, frame.height, frame.width, guidance, seed


class StyleServer:
    """Generates base and LoRA images from one set of base weights."""

    def __init__(self, pipeline, catalog: LoraCatalog, votes: VoteStore, limits: Limits = Limits(),
                 text_kwargs: Callable[[LoraInfo | None], dict] | None = None):
        self.pipeline, self.catalog, self.votes, self.limits = pipeline, catalog, votes, limits
        # The family's extra text arguments for a LoRA's images (or, with None, the base model's alone).
        self.text_kwargs = text_kwargs or (lambda info: {})
        self.bank = AdapterBank(pipeline, catalog)
        self._pairs = tempfile.TemporaryDirectory(prefix="ddiff-pairs-")  # blind pairs' files, removed at exit

    @classmethod
    def load(cls, family, model_path: str, lora_dir, votes_db, *, device: str = "cpu", dtype=torch.float32,
             max_sequence_length: int | None = None, limits: Limits = Limits(), votes_per_hour: int = 30) -> "StyleServer":
        """Loads the family's pipeline once and serves every LoRA folder under ``lora_dir`` from it."""
        pipeline = family.load_pipeline(model_path, dtype=dtype).to(device)
        pipeline.set_progress_bar_config(disable=True)

        def text_kwargs(info: LoraInfo | None) -> dict:
            # The length asked for, else the one the LoRA was trained at, else the family's default. Base and LoRA
            # images of one comparison read the same length, so the LoRA is the only difference between them.
            length = max_sequence_length or (info.max_sequence_length if info else None)
            return family.prompt_kwargs(length or family.default_max_sequence_length)

        return cls(pipeline, LoraCatalog(lora_dir), VoteStore(votes_db, votes_per_hour=votes_per_hour), limits,
                   text_kwargs=text_kwargs)

    def styles(self) -> list[str]:
        """The LoRAs that can be served now (the folder is read again only when it changed)."""
        return self.bank.snapshot()[0]

    def unavailable(self) -> dict[str, str]:
        """LoRA folders that cannot be served, with the reason (no server paths in it)."""
        return self.bank.snapshot()[1]

    # -- checks ------------------------------------------------------------------------------
    def check(self, prompt, steps, size, guidance, seed=0, aspect="1:1") -> tuple[str, int, int, int, float, int]:
        return check_request(self.limits, prompt, steps, size, guidance, seed, aspect)

    def style(self, name) -> LoraInfo:
        """A servable LoRA chosen by its exact name from the list (a request never names a path); unavailable folders
        are refused with their reason."""
        if not isinstance(name, str) or not name or len(name) > 200:
            raise RequestError("choose a LoRA by its name from the list")
        with self.bank.lock:
            self.bank.sync()
            if name in self.bank.loaded:
                return self.bank.loaded[name]
            unavailable, available = self.bank.unavailable, sorted(self.bank.loaded)
        if name in unavailable:
            raise RequestError(f"LoRA {name!r} is unavailable: {unavailable[name]}")
        if any(s in name for s in ("/", "\\", "..", ":")):
            raise RequestError(f"choose a LoRA by its name from the list, not {name[:60]!r}")
        raise RequestError(f"unknown LoRA {name[:60]!r}; loaded: {', '.join(available) or 'none'}")

    # -- generation --------------------------------------------------------------------------
    def _image(self, prompt: str, lora: str | None, steps: int, height: int, width: int, guidance: float, seed: int,
               info: LoraInfo | None = None):
        """One image; ``lora`` the adapter to apply (None: the base model), ``info`` the LoRA whose text length to
        use (for both images of a comparison)."""
        with self.bank.lock:
            self.bank.select(lora)
            device = self.pipeline.device
            with torch.no_grad():
                return self.pipeline(
                    prompt=prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator(device).manual_seed(seed), **self.text_kwargs(info),
                ).images[0]

    def compare(self, prompt, style, seed, steps, size, guidance, aspect="1:1"):
        """(base image, LoRA image) for the same prompt and seed."""
        prompt, steps, height, width, guidance, seed = self.check(prompt, steps, size, guidance, seed, aspect)
        info = self.style(style)
        lora_prompt, base_prompt = styled_prompts(prompt, info)
        return (self._image(base_prompt, None, steps, height, width, guidance, seed, info),
                self._image(lora_prompt, info.name, steps, height, width, guidance, seed, info))

    def single(self, prompt, style, seed, steps, size, guidance, aspect="1:1"):
        """One image, from a LoRA or (``style`` == BASE) the base model."""
        prompt, steps, height, width, guidance, seed = self.check(prompt, steps, size, guidance, seed, aspect)
        if style == BASE:
            return self._image(prompt, None, steps, height, width, guidance, seed)
        info = self.style(style)
        return self._image(styled_prompts(prompt, info)[0], info.name, steps, height, width, guidance, seed, info)

    def blind(self, prompt, style, steps, size, guidance, aspect="1:1", client: str = "") -> tuple[Path, Path, str]:
        """Base and LoRA images in random order, as (left file, right file, pair token).

        The seed is drawn here and kept with the order on the server, and each file carries a random nonce, so a
        client can link a pair to no other output (not even by comparing files) and learns nothing but the token.
        """
        prompt, steps, height, width, guidance, _ = self.check(prompt, steps, size, guidance, 0, aspect)
        info = self.style(style)
        token, base_side, seed = self.votes.new_pair(info.name, prompt, client)
        lora_prompt, base_prompt = styled_prompts(prompt, info)
        base = self._image(base_prompt, None, steps, height, width, guidance, seed, info)
        lora = self._image(lora_prompt, info.name, steps, height, width, guidance, seed, info)
        left, right = (base, lora) if base_side == "left" else (lora, base)
        return self._pair_file(left), self._pair_file(right), token

    def _pair_file(self, image) -> Path:
        folder = Path(self._pairs.name)
        for old in folder.glob("*.png"):  # the page has copied them long since
            if old.stat().st_mtime < time.time() - self.votes.pair_ttl_s:
                old.unlink(missing_ok=True)
        info = PngImagePlugin.PngInfo()
        info.add_text("nonce", secrets.token_hex(16))
        path = folder / f"{secrets.token_hex(16)}.png"
        image.save(path, pnginfo=info)
        return path

    def vote(self, token, side, client: str = "") -> str:
        try:
            return self.votes.vote(str(token or "")[:64], side, client)
        except ValueError as err:
            raise RequestError(str(err)) from err

    def results_table(self) -> list[list]:
        """[LoRA, votes, LoRA wins, win rate, 95% interval] rows."""
        return [[lora, votes, wins, f"{wins / votes:.0%}", f"{low:.0%}-{high:.0%}"]
                for lora, wins, votes, low, high in self.votes.results()]
