"""What a model family answers: the facts that upstream scripts inline, behind one interface.

Nothing outside ``families/`` asks a model which family it is; the training loop, caches,
validation and serving only call these methods.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ddiff_core.config import WEIGHTING_SCHEMES, LossSettings, TrainConfig
from ddiff_core.latents import LatentNorm


class TrainingObjective(ABC):
    """One run's diffusion loss: everything made for the run (samplers, schedules) lives here, not on the family."""

    @abstractmethod
    def loss(self, denoiser, latents: torch.Tensor, embeds: dict[str, torch.Tensor], generator: torch.Generator,
             conditioning: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The loss on normalized latents; all randomness from ``generator``. ``conditioning`` holds each image's
        geometry (``original_size`` and ``crop_top_left`` rows, in pixels) for families that use it (SDXL)."""


class ModelFamily(ABC):
    """A diffusers model family (FLUX, SD3, ...), as a plugin.

    Components are the pipeline's own ``components`` dict (``transformer``/``unet``, ``vae``,
    ``text_encoder``..., ``tokenizer``..., ``scheduler``); a family reads and assembles them.
    """

    name: ClassVar[str]
    #: ``_class_name`` values in ``model_index.json`` that this family claims.
    pipeline_class_names: ClassVar[tuple[str, ...]]
    #: The diffusers pipeline class, as "module:Class" (imported lazily).
    pipeline_class_path: ClassVar[str]
    #: The trained network's component name ("transformer" or "unet").
    denoiser_name: ClassVar[str] = "transformer"
    # Whether the denoiser's attention goes through diffusers' dispatcher (so --attention_backend applies).
    attention_backends: ClassVar[bool] = False
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    #: LoRA target presets: name -> PEFT ``target_modules`` (list of suffixes, or a full-match regex).
    lora_presets: ClassVar[dict[str, list[str] | str]]
    default_lora_preset: ClassVar[str]
    #: Image sides must be a multiple of this (VAE downsampling times latent packing).
    resolution_multiple: ClassVar[int] = 8
    #: The default aspect buckets' sides are a multiple of this (None: ``resolution_multiple``): sizes the denoiser
    #: takes without resampling inside.
    bucket_multiple: ClassVar[int | None] = None
    #: Key prefix for diffusers' PEFT -> kohya conversion; None where diffusers cannot convert.
    kohya_prefix: ClassVar[str | None] = None
    #: Epsilon/v-prediction families take --snr_gamma, --noise_offset and --prediction_type.
    noise_prediction: ClassVar[bool] = False
    #: Validation uses classifier-free guidance, so unconditional (negative) embeddings are made too.
    uses_cfg: ClassVar[bool] = False
    #: Defaults of the flags left unset (None): the family's own (SD3: logit-normal timesteps as upstream's SD3 script,
    #: 256 T5 tokens as the SD3 pipeline, where upstream's script uses 77).
    default_weighting_scheme: ClassVar[str] = "none"
    default_max_sequence_length: ClassVar[int] = 512

    # -- loading ---------------------------------------------------------------------------
    @property
    def pipeline_class(self) -> type:
        module, _, attr = self.pipeline_class_path.partition(":")
        return getattr(importlib.import_module(module), attr)

    def load_components(
        self, path: str, *, revision: str | None = None, variant: str | None = None, dtype: torch.dtype = torch.float32,
        quantization_config=None,
    ) -> dict[str, Any]:
        """Loads every component of the pipeline at ``path`` (frozen, eval mode); ``quantization_config``: diffusers'
        PipelineQuantizationConfig (ddiff_core.quantization), or None."""
        extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
        pipe = self.pipeline_class.from_pretrained(path, revision=revision, variant=variant, dtype=dtype, **extra)
        components = {**pipe.components, **self.pipeline_settings(pipe)}
        for module in components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        vae = components.get("vae")
        if dtype == torch.float16 and vae is not None and vae.config.get("force_upcast", False):
            vae.to(torch.float32)  # its config says it overflows in fp16 (the SDXL VAE does)
        return components

    def pipeline_settings(self, pipeline) -> dict[str, Any]:
        """Settings of the model's pipeline (``model_index.json``) that are not modules but change its images, kept
        with the components so a pipeline assembled from them behaves as the stock one loaded from the folder."""
        return {}

    def load_pipeline(self, path: str, **kwargs):
        """The stock pipeline for inference (serving)."""
        return self.pipeline_class.from_pretrained(path, **kwargs)

    def repeated_block_classes(self, denoiser) -> tuple[str, ...]:
        """Class names of the denoiser's repeated blocks: what regional compilation compiles once per class and
        ``--gradient_checkpointing_interval`` counts (diffusers' ``_repeated_blocks`` where the model declares it)."""
        return tuple(getattr(denoiser, "_repeated_blocks", None) or ())

    def assemble_pipeline(self, components: dict[str, Any]):
        """A pipeline over components already in memory (no load, no copy)."""
        return self.pipeline_class(**components)

    def check_resolution(self, resolution: int) -> None:
        """Raises ValueError when the family cannot train at ``resolution``."""
        if resolution <= 0 or resolution % self.resolution_multiple:
            raise ValueError(
                f"--resolution {resolution} is not a positive multiple of {self.resolution_multiple}, "
                f"which {self.name} needs"
            )

    # -- latents ---------------------------------------------------------------------------
    def latent_norm(self, vae_config) -> LatentNorm:
        return LatentNorm.from_vae_config(vae_config)

    @torch.no_grad()
    def encode_images(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> the VAE's latent distribution parameters ``[mean, logvar]`` (raw space)."""
        return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters

    @torch.no_grad()
    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> pixels in [0, 1] (B, 3, H, W), through the one LatentNorm."""
        raw = self.latent_norm(vae.config).denormalize(latents.to(vae.device, vae.dtype))
        return (vae.decode(raw, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)

    def decode_pipeline_latents(self, pipeline, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """What a pipeline returns for ``output_type="latent"`` -> pixels in [0, 1]."""
        return self.decode_latents(pipeline.vae, latents)

    # -- text ------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(
        self, components: dict[str, Any], prompts: list[str], *, device: torch.device, max_sequence_length: int
    ) -> dict[str, torch.Tensor]:
        """Prompts -> named embedding tensors, batch first (what the denoiser is conditioned on)."""

    def prompt_kwargs(self, max_sequence_length: int) -> dict:
        """Extra text arguments the family's pipeline takes with a prompt (T5 families: the sequence length)."""
        return {}

    def validation_embeds(self, components, prompts: list[str], *, device, max_sequence_length: int) -> dict:
        """Embeddings the pipeline needs for validation images, encoded once so the encoders can be freed;
        families that validate with classifier-free guidance get the stock pipeline's ``negative_*`` embeddings too."""
        embeds = self.encode_prompts(components, prompts, device=device, max_sequence_length=max_sequence_length)
        if not self.uses_cfg:
            return embeds
        negative = self.unconditional_embeds(components, embeds, device=device, max_sequence_length=max_sequence_length)
        return {**embeds, **{f"negative_{k}": v for k, v in negative.items()}}

    def unconditional_embeds(self, components, embeds: dict, *, device, max_sequence_length: int) -> dict:
        """What the stock pipeline guides away from when no negative prompt is given: the empty prompt, encoded."""
        count = len(next(iter(embeds.values())))
        return self.encode_prompts(components, [""] * count, device=device, max_sequence_length=max_sequence_length)

    def resolve_config(self, config: TrainConfig, recorded: dict | None = None) -> TrainConfig:
        """``config`` with the flags left unset filled in: from ``recorded`` (the settings in the run.json of a run
        being resumed, so a run keeps what it started with when a default changes) where valid, else the family's
        defaults."""
        recorded = recorded or {}
        scheme, length = recorded.get("weighting_scheme"), recorded.get("max_sequence_length")
        if scheme not in WEIGHTING_SCHEMES:
            scheme = self.default_weighting_scheme
        if not (type(length) is int and 1 <= length <= 512):
            length = self.default_max_sequence_length
        return dataclasses.replace(config, weighting_scheme=config.weighting_scheme or scheme,
                                   max_sequence_length=config.max_sequence_length or length)

    def default_buckets(self, resolution: int) -> list:
        """The aspect buckets used when none are given: film and photo frames at about ``resolution``² pixels."""
        from ddiff_core.buckets import default_buckets

        return default_buckets(resolution, self.bucket_multiple or self.resolution_multiple)

    def loss_settings(self, config: TrainConfig | None = None) -> LossSettings:
        """The objective's settings of ``config`` (the defaults when None), the family's defaults filled in."""
        return LossSettings.from_config(self.resolve_config(config or TrainConfig()))

    def check_settings(self, settings: LossSettings, lora_format: str = "diffusers") -> None:
        """Raises ValueError for settings that do not apply to this family."""
        if lora_format == "kohya" and self.kohya_prefix is None:
            raise ValueError(f"--lora_format kohya is not available for {self.name}: diffusers has no converter for it")
        if not self.noise_prediction:
            for flag in ("snr_gamma", "noise_offset", "prediction_type"):
                if getattr(settings, flag):
                    raise ValueError(f"--{flag} applies to epsilon/v-prediction families, not {self.name}")
        elif settings.weighting_scheme != "none":
            raise ValueError(f"--weighting_scheme applies to flow-matching families, not {self.name} "
                             "(use --snr_gamma for Min-SNR weighting)")

    # -- training --------------------------------------------------------------------------
    @abstractmethod
    def training_objective(self, components: dict[str, Any], settings: LossSettings) -> "TrainingObjective":
        """The objective of one run (its timestep sampler, noise schedule and conditioning), made from the loaded
        components; the run owns it, so two runs in one process never share state."""

    def lora_target_modules(self, lora_layers: str | None) -> list[str] | str:
        """A preset name or a comma-separated list of module names -> PEFT ``target_modules``."""
        if not lora_layers:
            lora_layers = self.default_lora_preset
        if lora_layers in self.lora_presets:
            preset = self.lora_presets[lora_layers]
            return preset if isinstance(preset, str) else list(preset)
        return [name.strip() for name in lora_layers.split(",") if name.strip()]

    def save_lora_weights(self, output_dir: str, lora_state: dict[str, torch.Tensor], lora_config_dict: dict) -> None:
        """Writes ``pytorch_lora_weights.safetensors`` in the format the stock pipeline's ``load_lora_weights`` reads."""
        self.pipeline_class.save_lora_weights(
            output_dir,
            **{f"{self.denoiser_name}_lora_layers": lora_state},
            **{f"{self.denoiser_name}_lora_adapter_metadata": lora_config_dict},
        )
