"""TrainConfig: the training flags (upstream diffusers names and meanings), a strict YAML merge, checked once.

An unknown flag, an unknown YAML key, a value of the wrong type or an unknown choice string is an error;
nothing falls back to a default silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Timestep sampling / loss weighting of the flow-matching families (diffusers.training_utils names).
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


class ConfigError(ValueError):
    """A bad flag, key or value; the message is one line naming it."""


def _opt(default, help: str, choices: tuple | None = None, **extra):
    return field(default=default, metadata={"help": help, "choices": choices, **extra})


@dataclass
class TrainConfig:
    # -- model -------------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = _opt(None, "Local pipeline folder or hub id of the base model.")
    revision: str | None = _opt(None, "Model revision (hub).")
    variant: str | None = _opt(None, "Weights variant, e.g. fp16.")
    model_family: str | None = _opt(None, "Model family; found from model_index.json when omitted.")
    cache_dir: str | None = _opt(None, "Hugging Face download cache folder.")
    base_quantization: str = _opt("none", "Quantize the frozen denoiser's weights at load (int8 and fp8 weight-only "
                                          "through torchao, nf4 through bitsandbytes); the LoRA stays in full precision.",
                                  ("none", "int8", "fp8", "nf4"))
    bnb_quantization_config_path: str | None = _opt(None, "Upstream's flag: a JSON BitsAndBytesConfig for the "
                                                          "denoiser (implies --base_quantization nf4).")
    do_fp8_training: bool = _opt(False, "Upstream's flag, read here as --base_quantization fp8.")
    # -- data --------------------------------------------------------------------------------
    instance_data_dir: str | None = _opt(None, "Image folder: metadata.jsonl (file_name, text) or .txt captions.")
    dataset_name: str | None = _opt(None, "datasets.load_dataset name or local folder.")
    dataset_config_name: str | None = _opt(None, "Config name for --dataset_name.")
    image_column: str = _opt("image", "Image column of --dataset_name.")
    caption_column: str | None = _opt(None, "Caption column (default 'text' for folders, none for datasets).")
    instance_prompt: str | None = _opt(None, "Caption for images that have none.")
    repeats: int = _opt(1, "How many times to repeat the training data.")
    resolution: int = _opt(512, "Training resolution: the side of a square, or about the square root of each bucket's area.")
    use_aspect_ratio_buckets: bool = _opt(False, "Train each image in the aspect-ratio bucket nearest its frame.")
    aspect_ratio_buckets: str | None = _opt(None, "Buckets as 'h1,w1;h2,w2' (implies --use_aspect_ratio_buckets); "
                                                  "default: film and photo ratios at about --resolution² pixels.")
    center_crop: bool = _opt(False, "Center-crop instead of random crop.")
    random_flip: bool = _opt(False, "Randomly flip images horizontally (fixed per image).")
    dataloader_num_workers: int = _opt(0, "DataLoader worker processes.")
    max_sequence_length: int | None = _opt(None, "Max T5 sequence length (default: the family's pipeline default, "
                                                 "512 for FLUX, 256 for SD3).")
    cache_latents: bool = _opt(False, "Encode every image once with the VAE and cache the latents.")
    offload_vae: bool | None = _opt(None, "Keep the VAE on the CPU except while it encodes or decodes (default: on "
                                          "when the latents are cached).")
    offload: bool = _opt(False, "Upstream's flag, read here as --offload_vae (cached text embeddings already free the "
                                "text encoders).")
    cache_text_embeddings: bool = _opt(True, "Encode every caption once and cache it (text encoders are frozen).")
    feature_cache_dir: str | None = _opt(None, "Where latent/text caches live (default OUTPUT_DIR/cache).")
    max_image_pixels: int = _opt(40_000_000, "Skip images with more pixels than this (decoding cost; default 40 MP).")
    holdout: float = _opt(0.0, "Keep this many images (or this fraction, below 1) out of training, chosen by --seed "
                               "(0 when unset) and listed in OUTPUT_DIR/holdout.jsonl for scripts/evaluate.py.")
    # -- LoRA --------------------------------------------------------------------------------
    rank: int = _opt(4, "LoRA rank.")
    lora_alpha: int = _opt(4, "LoRA alpha.")
    lora_dropout: float = _opt(0.0, "LoRA dropout.")
    lora_layers: str | None = _opt(None, "A preset name or comma-separated module names to adapt.")
    lora_format: str = _opt("diffusers", "'kohya' also writes pytorch_lora_weights_kohya.safetensors (SD1.5/SDXL).",
                            ("diffusers", "kohya"))
    # -- optimisation ------------------------------------------------------------------------
    train_batch_size: int = _opt(4, "Batch size per device.")
    num_train_epochs: int = _opt(1, "Epochs (ignored when --max_train_steps is set).")
    max_train_steps: int | None = _opt(None, "Total optimizer steps; overrides --num_train_epochs.")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward to save memory.")
    gradient_checkpointing_interval: int = _opt(1, "With --gradient_checkpointing: recompute every N-th repeated "
                                                   "block only (2: about half the memory saved, half the recompute).")
    compile: bool | None = _opt(None, "Regional torch.compile: each repeated block class compiled once, reused by "
                                      "every block of it (validation runs uncompiled). Default: on for FLUX with an "
                                      "unquantized base on one CUDA GPU or under DDP, where it was measured; off "
                                      "elsewhere. --no-compile turns it off.")
    attention_backend: str | None = _opt(None, "diffusers attention backend (default: native SDPA, which picks "
                                               "flash attention on CUDA), e.g. flash, _native_math, xformers; or "
                                               "ddiff_cudnn (cuDNN's attention with the gradient in its output's "
                                               "layout: 1.23x faster compiled FLUX step at 1024 px on an H200; "
                                               "needs bf16 or fp16).")
    learning_rate: float = _opt(1e-4, "Initial learning rate.")
    scale_lr: bool = _opt(False, "Scale the LR by batch size, accumulation steps and processes.")
    lr_scheduler: str = _opt(
        "constant",
        "LR schedule.",
        ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    )
    lr_warmup_steps: int = _opt(500, "Warm-up steps of the LR schedule.")
    lr_num_cycles: int = _opt(1, "Hard restarts for cosine_with_restarts.")
    lr_power: float = _opt(1.0, "Power factor of the polynomial schedule.")
    optimizer: str = _opt("AdamW", "Optimizer.", ("AdamW", "prodigy"), casefold=True)
    use_8bit_adam: bool = _opt(False, "AdamW with 8-bit states (bitsandbytes).")
    adam_beta1: float = _opt(0.9, "Adam beta1.")
    adam_beta2: float = _opt(0.999, "Adam beta2.")
    adam_weight_decay: float = _opt(1e-4, "Weight decay.")
    adam_epsilon: float = _opt(1e-8, "Adam epsilon.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm.")
    mixed_precision: str | None = _opt(None, "Mixed precision (frozen weights in this dtype, LoRA in fp32).", ("no", "fp16", "bf16"))
    allow_tf32: bool = _opt(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    seed: int | None = _opt(None, "Seed for a reproducible run.")
    use_ema: bool = _opt(False, "Keep an exponential moving average of the LoRA weights, saved as "
                                "pytorch_lora_weights_ema.safetensors.")
    ema_decay: float = _opt(0.999, "EMA decay per optimizer step (warmed up as min(decay, (1+t)/(10+t))).")
    # -- flow matching -----------------------------------------------------------------------
    guidance_scale: float = _opt(3.5, "Guidance embedding value for guidance-distilled models (FLUX.1-dev).")
    weighting_scheme: str | None = _opt(None, "Timestep sampling / loss weighting (default: the family's, as "
                                              "upstream: none for FLUX, logit_normal for SD3).", WEIGHTING_SCHEMES)
    logit_mean: float = _opt(0.0, "Mean for logit_normal.")
    logit_std: float = _opt(1.0, "Std for logit_normal.")
    mode_scale: float = _opt(1.29, "Scale for the mode weighting scheme.")
    # -- epsilon / v-prediction families (SD1.5, SDXL) ------------------------------------------
    snr_gamma: float | None = _opt(None, "Min-SNR loss weighting gamma (5.0 is the paper's choice).")
    noise_offset: float = _opt(0.0, "Noise offset (UNet families).")
    prediction_type: str | None = _opt(None, "Override the scheduler's prediction type.", ("epsilon", "v_prediction"))
    # -- validation --------------------------------------------------------------------------
    validation_prompt: str | None = _opt(None, "Prompt(s) for validation images; separate several with '|'.")
    num_validation_images: int = _opt(4, "Images per validation prompt, generated in one batched call.")
    validation_epochs: int = _opt(50, "Validate every N epochs.")
    validation_steps: int | None = _opt(None, "Validate every N optimizer steps (instead of --validation_epochs).")
    validation_inference_steps: int = _opt(28, "Denoising steps per validation image.")
    validation_guidance_scale: float = _opt(3.5, "Guidance scale of validation images.")
    validation_use_ema: bool = _opt(False, "Validation images and the final comparison use the EMA weights.")
    validation_resolution: str | None = _opt(None, "'HxW' or several 'HxW,HxW' (default: the most common bucket, "
                                                   "or --resolution square).")
    # -- checkpoints -------------------------------------------------------------------------
    checkpointing_steps: int = _opt(500, "Write a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: int | None = _opt(None, "Keep at most this many checkpoints (oldest pruned after a save).")
    resume_from_checkpoint: str | None = _opt(None, "'latest' or a checkpoint folder to resume from.")
    # -- output and logging ------------------------------------------------------------------
    output_dir: str = _opt("ddiff-lora", "Where the LoRA, model card, logs and checkpoints go.")
    overwrite_output_dir: bool = _opt(False, "Delete an earlier run's files in --output_dir before training.")
    report_to: str = _opt("tensorboard", "Tracker.", ("tensorboard", "wandb", "none"))
    logging_dir: str = _opt("logs", "TensorBoard folder, relative to --output_dir.")

    def validate(self) -> None:
        """Checks values that need more than a type; raises ConfigError naming the problem."""
        if not self.pretrained_model_name_or_path:
            raise ConfigError("--pretrained_model_name_or_path is required")
        if not self.instance_data_dir and not self.dataset_name:
            raise ConfigError("one of --instance_data_dir or --dataset_name is required")
        if self.instance_data_dir and self.dataset_name:
            raise ConfigError("give only one of --instance_data_dir and --dataset_name")
        positive = ("gradient_checkpointing_interval", "num_validation_images", "validation_epochs", "validation_inference_steps", "checkpointing_steps", "repeats", "train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "rank", "max_image_pixels")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ConfigError(f"--max_train_steps must be at least 1, got {self.max_train_steps}")
        for name in ("validation_steps", "checkpoints_total_limit", "max_sequence_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.dataloader_num_workers < 0 or self.lr_warmup_steps < 0:
            raise ConfigError("--dataloader_num_workers and --lr_warmup_steps must not be negative")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ConfigError("give only one of --overwrite_output_dir and --resume_from_checkpoint")
        if self.aspect_ratio_buckets:
            from ddiff_core.buckets import BucketError, parse_buckets

            try:
                parse_buckets(self.aspect_ratio_buckets)
            except BucketError as err:
                raise ConfigError(str(err)) from err
        if self.validation_resolution:
            self.validation_sizes  # raises on a bad value
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.holdout < 0 or (self.holdout >= 1 and self.holdout != int(self.holdout)):
            raise ConfigError(f"--holdout must be a whole number of images or a fraction below 1, got {self.holdout}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.do_fp8_training:
            if self.base_quantization not in ("none", "fp8"):
                raise ConfigError(f"--do_fp8_training means --base_quantization fp8, not {self.base_quantization}")
            self.base_quantization = "fp8"
        if self.bnb_quantization_config_path:
            if self.base_quantization not in ("none", "nf4"):
                raise ConfigError("--bnb_quantization_config_path means --base_quantization nf4, not "
                                  f"{self.base_quantization}")
            self.base_quantization = "nf4"
        if self.use_8bit_adam and self.optimizer != "AdamW":
            raise ConfigError("--use_8bit_adam is an AdamW; it does not combine with --optimizer prodigy")
        if self.validation_use_ema and not self.use_ema:
            raise ConfigError("--validation_use_ema needs --use_ema")

    @property
    def buckets_enabled(self) -> bool:
        return self.use_aspect_ratio_buckets or bool(self.aspect_ratio_buckets)

    @property
    def validation_sizes(self) -> list[tuple[int, int]]:
        """--validation_resolution as (height, width) pairs; [] when not given.

        Raises:
            ConfigError: a value that is not 'HxW[,HxW...]'.
        """
        sizes = []
        for part in (self.validation_resolution or "").split(","):
            if not part.strip():
                continue
            match = re.fullmatch(r"([0-9]+)x([0-9]+)", part.strip().lower())
            if not match or 0 in (int(match.group(1)), int(match.group(2))):
                raise ConfigError(f"--validation_resolution {part.strip()!r} is not HxW (e.g. 768x1344)")
            sizes.append((int(match.group(1)), int(match.group(2))))
        return sizes

    @property
    def validation_prompts(self) -> list[str]:
        return [p.strip() for p in (self.validation_prompt or "").split("|") if p.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LossSettings:
    """What a family's training objective reads: the loss and timestep settings, typed, nothing else of the run."""

    weighting_scheme: str
    logit_mean: float
    logit_std: float
    mode_scale: float
    guidance_scale: float
    snr_gamma: float | None
    noise_offset: float
    prediction_type: str | None

    @classmethod
    def from_config(cls, config: TrainConfig | None = None) -> "LossSettings":
        """The settings of ``config`` (the defaults when None): TrainConfig holds the one copy of each default."""
        config = config or TrainConfig()
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def _scalar_type(hint) -> type:
    """``int | None`` -> int; ``str`` -> str."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


_HINTS = typing.get_type_hints(TrainConfig)
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _short(value, limit: int = 80) -> str:
    """A value for an error message: a crafted YAML value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _coerce(name: str, value, source: str):
    """Type-checks one value from YAML (the command line is typed by argparse) and normalizes choices."""
    kind = _scalar_type(_HINTS[name])
    meta = _FIELDS[name].metadata
    if value is not None:
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{source}: {name} must be true or false, got {_short(value)}")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is float and isinstance(value, str):  # YAML reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {_short(value)}")
    choices = meta.get("choices")
    if choices and value is not None:
        if meta.get("casefold"):
            matches = [c for c in choices if c.lower() == str(value).lower()]
            value = matches[0] if matches else value
        if value not in choices:
            raise ConfigError(f"{source}: {name} {_short(value)} is not one of {', '.join(choices)}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors become one-line ConfigErrors
        raise ConfigError(message)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(description=description, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file holding any of these keys; the command line overrides it.")
    for name, f in _FIELDS.items():
        kind = _scalar_type(_HINTS[name])
        meta = f.metadata
        if kind is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
        else:
            parser.add_argument(f"--{name}", type=kind, default=None, help=meta["help"])
    return parser


MAX_CONFIG_BYTES = 1 << 20


def load_yaml_mapping(text: str, source: str) -> dict:
    """A YAML mapping, parsed safely (no Python objects) and without anchors or aliases: a few kilobytes of nested
    aliases expand to gigabytes.

    Raises:
        ConfigError: not YAML, aliases, or not a mapping.
    """
    try:
        if any(isinstance(token, (yaml.AliasToken, yaml.AnchorToken)) for token in yaml.scan(text)):
            raise ConfigError(f"{source} uses YAML anchors or aliases (&name / *name); write the values out")
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source} must hold a mapping of flag names to values")
    return loaded


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config {path} is larger than 1 MiB")
    return load_yaml_mapping(path.read_text(), f"--config {path}")


def _coerce_all(loaded: dict, source: str) -> dict:
    values = {}
    for key, value in loaded.items():
        key = str(key).replace("-", "_")
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown key {_short(key)}")
        values[key] = _coerce(key, value, source)
    return values


def parse_config(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """Command line (and ``--config`` YAML) -> a validated TrainConfig, for a launch of one run.

    Raises:
        ConfigError: an unknown flag or key, a wrong type, an unknown choice, a missing requirement, or a
            ``runs:`` list (see :func:`parse_launch`).
    """
    runs = parse_launch(argv, description)
    if runs[0].name is not None:
        raise ConfigError("this config has a 'runs:' list; use parse_launch")
    return runs[0].config


# Keys every run of one launch shares: the base model is loaded once, one accelerator runs them all, and each run's
# folder is OUTPUT_DIR/<name>.
SHARED_ONLY = ("pretrained_model_name_or_path", "revision", "variant", "model_family", "cache_dir", "mixed_precision",
               "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to", "logging_dir", "allow_tf32",
               "base_quantization", "bnb_quantization_config_path", "do_fp8_training", "offload", "offload_vae")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_RUN_NAMES = {"eval", "eval-ema", "logs", "cache", "launch.json"}  # what a launch or the evaluation writes beside the runs
MAX_RUNS = 256


@dataclass(frozen=True)
class RunSpec:
    """One run of a launch: its name (None for a launch without ``runs:``) and its whole config."""

    name: str | None
    config: TrainConfig


def parse_launch(argv: list[str] | None = None, description: str | None = None) -> list[RunSpec]:
    """Command line and ``--config`` YAML -> the launch's runs, each config validated.

    A YAML ``runs:`` list trains several LoRAs over one base model: each entry has a ``name`` (its folder under
    ``--output_dir``) and any keys that differ from the shared ones; the command line overrides both. Each run
    resumes its own latest checkpoint unless ``--overwrite_output_dir`` is given.

    Raises:
        ConfigError: as :func:`parse_config`, or a bad ``runs:`` list (names, shared-only keys, duplicates).
    """
    args = build_parser(description).parse_args(argv)
    loaded = _read_yaml(Path(args.config)) if args.config else {}
    source = f"--config {args.config}"
    entries = loaded.pop("runs", None)
    shared = _coerce_all(loaded, source)
    cli = {key: _coerce(key, getattr(args, key), f"--{key}") for key in _FIELDS if getattr(args, key) is not None}
    if entries is None:
        config = TrainConfig(**{**shared, **cli})
        config.validate()
        return [RunSpec(None, config)]
    if not isinstance(entries, list) or not entries or len(entries) > MAX_RUNS:
        raise ConfigError(f"{source}: runs must be a list of 1 to {MAX_RUNS} mappings, each with a name")
    base = {**shared, **cli}
    if base.get("resume_from_checkpoint") not in (None, "latest"):
        raise ConfigError("--resume_from_checkpoint with a runs: list must be 'latest' (each run resumes its own)")
    output_dir = Path(base.get("output_dir") or TrainConfig.output_dir)
    specs, seen = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{source}: runs[{i}] must be a mapping with a name")
        if not isinstance(entry["name"], str):
            raise ConfigError(f"{source}: runs[{i}]'s name must be a string, got {_short(entry['name'])}")
        entry = dict(entry)
        name = entry.pop("name")
        if not RUN_NAME.match(name) or name.lower() in RESERVED_RUN_NAMES or name.lower().endswith(".json"):
            raise ConfigError(f"{source}: run name {_short(name)} must be letters, digits, '.', '_' or '-', starting "
                              f"with a letter or digit (a folder name), and not one of "
                              f"{', '.join(sorted(RESERVED_RUN_NAMES))} or *.json")
        if name.lower() in seen:
            raise ConfigError(f"{source}: run name {_short(name)} appears twice")
        seen.add(name.lower())
        own = _coerce_all(entry, f"{source}: run {name}")
        fixed = sorted(set(own) & set(SHARED_ONLY))
        if fixed:
            raise ConfigError(f"{source}: run {name} sets {', '.join(fixed)}, which every run of a launch shares")
        values = {**shared, **own, **cli, "output_dir": str(output_dir / name)}
        if not values.get("overwrite_output_dir"):
            values["resume_from_checkpoint"] = "latest"
        config = TrainConfig(**values)
        try:
            config.validate()
        except ConfigError as err:
            raise ConfigError(f"run {name}: {err}") from err
        specs.append(RunSpec(name, config))
    return specs
