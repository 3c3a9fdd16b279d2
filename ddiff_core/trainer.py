"""The LoRA training run: setup from a TrainConfig, the optimizer-step loop, and the outputs.

The loop knows nothing of any model family; it asks the run's TrainingObjective (made by the family plugin) for the
loss and the TrainingFeatures object for each batch's latents and text embeddings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, get_grad_scaler, set_seed
from tqdm.auto import tqdm

from ddiff_core.buckets import (Bucket, BucketError, bucket_report, check_buckets, most_common,
                                nearest_bucket, parse_buckets)
from ddiff_core.builders import (add_trainable_lora, build_data, build_lr_scheduler, build_optimizer, load_base,
                                 remove_trainable_lora, trainable_params)
from ddiff_core.caching import TrainingFeatures, build_training_features, release_covered_encoders
from ddiff_core.checkpoint import CheckpointError, Checkpointer, latest_checkpoint
from ddiff_core.config import ConfigError, LossSettings, TrainConfig
from ddiff_core.data import HOLDOUT_FILE, DataError, load_records, screen_records, split_holdout, write_holdout
from ddiff_core.ema import LoraEMA
from ddiff_core.families import UnknownModelError, resolve_family
from ddiff_core.latents import sample_latents
from ddiff_core.lora import LORA_WEIGHTS_NAME, lora_digest, lora_state_dict, trigger_phrase
from ddiff_core.outputs import RunOutputs
from ddiff_core.precision import dtype_of
from ddiff_core.profiling import NullProfiler, peak_memory_mb
from ddiff_core.runs import (RunIdentity, check_output_dir, clear_run_outputs, data_identity, model_identity,
                             read_run_file, write_run_file)
from ddiff_core.memory import estimate_peak, out_of_memory_advice
from ddiff_core.quantization import check_quantization
from ddiff_core.speed import (DDIFF_BACKENDS, blocks_uncompiled, check_attention_backend, compiled_graphs,
                              default_compile, recompile_limit_hits, repeated_blocks, reset_attention_backend,
                              set_attention_backend)
from ddiff_core.validation import ValidationRunner

logger = logging.getLogger(__name__)


class FailedElsewhere(ValueError):
    """Another process of the run failed in the same phase (its own error says why)."""


# What a run's bad input raises (ConfigError and RunFolderError are ValueErrors): reported with exit code 2.
INPUT_ERRORS = (DataError, UnknownModelError, CheckpointError, ValueError, OSError)

class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT: the current step finished and a checkpoint was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteLoss(RuntimeError):
    """A NaN or infinite loss; nothing was stepped or written with it."""


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message gives the measured peak and the flags that lower it."""


def offload_idle_vae(trainers: list["LoraTrainer"]) -> bool:
    """Moves the shared VAE to the CPU when no step needs it (every run's latents cached) and it was not asked to stay
    (``--offload_vae``/``--offload`` on by default then); validation brings it back while it decodes."""
    first = trainers[0]
    vae = first.components.get("vae")
    wanted = first.config.offload or first.config.offload_vae
    cached = all(t.features.latent_cache is not None for t in trainers)
    if wanted is None:
        wanted = cached
    if wanted and not cached:
        logger.warning("--offload_vae: a run encodes its images every step (no --cache_latents); the VAE stays")
        wanted = False
    if vae is None or not wanted or first.accelerator.device.type == "cpu":
        return False
    vae.to("cpu")
    torch.cuda.empty_cache()
    for trainer in trainers:
        trainer.vae_offloaded = True
    return True


def agree(accelerator, error: BaseException | None) -> None:
    """Re-raises ``error``, and raises on every other process too, when any process failed in a phase: processes
    that went on alone would wait forever in the next collective."""
    if accelerator.num_processes > 1:
        failed = int(accelerator.reduce(torch.tensor(int(error is not None), device=accelerator.device),
                                        reduction="sum").item())
        if failed and error is None:
            raise FailedElsewhere(f"failed on another process (of {failed})")
    if error is not None:
        raise error


def compute_loss(objective, denoiser, features: TrainingFeatures, latent_norm, batch: dict, generator: torch.Generator,
                 weight_dtype: torch.dtype, autocast=None) -> torch.Tensor:
    """The training loss of one micro-batch: draw latents, normalize them once, ask the run's objective.

    The VAE and text encoders (when not cached) run outside ``autocast``, as they do when the caches are built, so
    caching changes no maths in any precision; only the denoiser runs under it.
    """
    latents = latent_norm.normalize(sample_latents(features.latent_params(batch), generator))
    embeds = {k: v.to(weight_dtype) for k, v in features.text_embeds(batch).items()}
    with autocast or nullcontext():
        return objective.loss(denoiser, latents.to(weight_dtype), embeds, generator, batch.get("conditioning"))


def _check_topology(accelerator, config: TrainConfig) -> None:
    """Refuses process layouts that would train wrongly, with a one-line reason.

    Raises:
        ConfigError: DeepSpeed, or several launched processes that are not synchronised.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # accelerate steps the DeepSpeed engine on every backward (our micro-batch accumulation would step it too
        # often and skip --max_grad_norm), and the ZeRO optimizer's state holds Python objects that only pickle
        # can store, which a checkpoint must never need.
        raise ConfigError("DeepSpeed is not supported: use accelerate_configs/ddp.yaml, or fsdp.yaml to shard the "
                          "frozen base (for a LoRA, ZeRO-2 shards only the small LoRA optimizer state)")
    if config.use_ema and accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("--use_ema is not supported under FSDP yet (the average would need gathering each step)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise ConfigError(f"{os.environ['WORLD_SIZE']} processes were launched but they are not synchronised (on a CPU "
                          "machine set ACCELERATE_USE_CPU=1 and use accelerate_configs/cpu_ddp.yaml)")


def env_flag(name: str) -> bool:
    """An accelerate launcher flag: it writes "False" as well as "True" (a value, not a presence)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "t", "yes", "y", "on")


def launch_device_type() -> str:
    """The device this process will train on, before its accelerator exists."""
    return "cuda" if torch.cuda.is_available() and not env_flag("ACCELERATE_USE_CPU") else "cpu"


def make_accelerator(config: TrainConfig, project_dir: Path) -> Accelerator:
    """The launch's one Accelerator (every run of a launch shares its precision and tracker kind)."""
    log_with = None if config.report_to == "none" else config.report_to
    acc = Accelerator(mixed_precision=config.mixed_precision, log_with=log_with,
                      project_config=ProjectConfiguration(project_dir=str(project_dir),
                                                          logging_dir=str(Path(project_dir) / config.logging_dir)))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if acc.is_main_process else logging.WARNING)
    if torch.cuda.is_available():
        # SDPA may pick its cuDNN kernel on Hopper, whose backward crashed with an illegal memory access on H100 and
        # H200 (torch 2.11): flash attention by default, as --attention_backend says. ddiff_cudnn asks for cuDNN
        # explicitly (sdpa_kernel), and _native_cudnn is refused (speed.KNOWN_BAD).
        torch.backends.cuda.enable_cudnn_sdp(False)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return acc


def load_shared_base(family, config: TrainConfig, accelerator) -> dict:
    """The frozen base in the launch's weight dtype, on its device: loaded once for every run of a launch."""
    return load_base(family, config.pretrained_model_name_or_path, dtype=dtype_of(accelerator.mixed_precision),
                     device=accelerator.device, revision=config.revision, variant=config.variant,
                     quantization=config.base_quantization, bnb_config_path=config.bnb_quantization_config_path)


def release_encoders(trainers: list["LoraTrainer"]) -> list[str]:
    """Frees the encoders that every run's caches cover; the VAE stays while any run validates or encodes."""
    keep_vae = any(t.validator is not None or t.features.latent_cache is None for t in trainers)
    return release_covered_encoders([t.features for t in trainers], keep_vae=keep_vae)


class LoraTrainer:
    """One training run, in phases a launch of many runs interleaves: ``check_inputs()`` (no model),
    ``attach()`` (seed, folder, data order), ``build_features()`` (caches, validator: needs the encoders),
    ``start()`` (the LoRA, optimizer, resume), ``train()``, ``save()``, ``cleanup()`` (the LoRA removed again).
    ``setup()`` runs the first four for a run alone."""

    def __init__(self, config: TrainConfig, profiler=None, name: str | None = None):
        self.config = config
        self.name = name  # the run's name in a launch of several, else None
        self.profiler = profiler or NullProfiler()
        self.output_dir = Path(config.output_dir)
        self.outputs = RunOutputs(self.output_dir)
        self.global_step = 0
        self.ema = None
        self.vae_offloaded = False
        self.compile_by_default = False

    # -- setup -------------------------------------------------------------------------------
    def check_inputs(self) -> None:
        """Everything that can be checked before a model is loaded: family, resolution, data, the output folder and
        any checkpoint to resume."""
        self.family = resolve_family(self.config.pretrained_model_name_or_path, self.config.model_family)
        # A resumed run keeps what it recorded for the flags left unset, even where a default changed since.
        self.recorded = (read_run_file(self.output_dir) or {}) if self.config.resume_from_checkpoint else {}
        self.config = cfg = self.family.resolve_config(self.config, self.recorded)
        self.family.check_resolution(cfg.resolution)
        self.loss_settings = LossSettings.from_config(cfg)
        self.family.check_settings(self.loss_settings, cfg.lora_format)
        device_type = launch_device_type()
        if cfg.attention_backend in DDIFF_BACKENDS and cfg.mixed_precision not in ("bf16", "fp16"):
            raise ConfigError(f"--attention_backend {cfg.attention_backend} runs cuDNN's attention, which takes bf16 or "
                              "fp16 only: add --mixed_precision bf16")
        check_attention_backend(cfg.attention_backend, device_type, self.family)
        self.compile_by_default = cfg.compile is None and default_compile(
            self.family.name, device_type, cfg.base_quantization, sharded=env_flag("ACCELERATE_USE_FSDP"))
        self.config = cfg = dataclasses.replace(cfg, compile=bool(cfg.compile or self.compile_by_default))
        check_quantization(cfg.base_quantization, device_type, cfg.bnb_quantization_config_path)
        if cfg.optimizer == "prodigy" or cfg.use_8bit_adam:
            build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)  # fails fast when the package is missing
        records, self.hf_dataset = load_records(cfg)
        self.records, self.skipped = screen_records(records, self.hf_dataset, cfg.image_column,
                                                    max_pixels=cfg.max_image_pixels)
        if not self.records:
            source = cfg.instance_data_dir or cfg.dataset_name
            raise DataError(f"no usable images in {source}: all {len(self.skipped)} were skipped "
                            f"({'; '.join(f'{n}: {r}' for n, r in self.skipped[:3])})")
        self.records, self.holdout = split_holdout(self.records, cfg.holdout, cfg.seed or 0)
        self._plan_frames()
        mixed_precision = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no"
        try:
            dtype_of(mixed_precision)
        except ValueError as err:  # e.g. fp8 from an accelerate config
            raise ConfigError(f"mixed precision {mixed_precision!r} is not supported (no, fp16 or bf16)") from err
        model = model_identity(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
        self.identity = RunIdentity.of(dataclasses.replace(cfg, mixed_precision=mixed_precision), self.family.name,
                                       model, data_identity(self.records), self.buckets)
        check_output_dir(self.output_dir, self.identity, resume=cfg.resume_from_checkpoint,
                         overwrite=cfg.overwrite_output_dir)
        # A checkpoint to resume must be whole and of this run: checked now, before any model loads.
        self.resume_path = self.resume_manifest = None
        if cfg.resume_from_checkpoint == "latest":
            self.resume_path = latest_checkpoint(self.output_dir, self.identity.fingerprint)
        elif cfg.resume_from_checkpoint:
            self.resume_path = Path(cfg.resume_from_checkpoint)
        if self.resume_path is not None:
            self.resume_manifest = Checkpointer(None, self.output_dir, self.identity).check(self.resume_path)

    def _plan_frames(self) -> None:
        """Each record's aspect bucket (with buckets on) and the validation frames, checked against the family."""
        cfg, family = self.config, self.family
        self.buckets = self.targets = None
        if cfg.buckets_enabled:
            self.buckets = (parse_buckets(cfg.aspect_ratio_buckets) if cfg.aspect_ratio_buckets
                            else self._recorded_buckets() or family.default_buckets(cfg.resolution))
            check_buckets(self.buckets, family.resolution_multiple, family.name)
            self.targets = [nearest_bucket(r.size, self.buckets) for r in self.records]
        self.validation_sizes = cfg.validation_sizes or (
            [(most_common(self.targets).height, most_common(self.targets).width)] if self.targets
            else [(cfg.resolution, cfg.resolution)])
        try:
            check_buckets([Bucket(h, w) for h, w in self.validation_sizes], family.resolution_multiple, family.name)
        except BucketError as err:
            raise ConfigError(str(err).replace("--aspect_ratio_buckets", "--validation_resolution")) from err

    def _recorded_buckets(self) -> list[Bucket] | None:
        """The default buckets a resumed run started with (run.json), when valid for this family; else None."""
        names = self.recorded.get("buckets")
        if not isinstance(names, list) or not names or len(names) > 256:
            return None
        try:
            buckets = parse_buckets(";".join(str(n).replace("x", ",") for n in names))
            check_buckets(buckets, self.family.resolution_multiple, self.family.name)
        except BucketError:
            return None
        return buckets

    def setup(self, accelerator=None) -> "LoraTrainer":
        """A run alone: checks, then loads the base, builds the caches, frees the encoders and adds the LoRA."""
        self.check_inputs()
        self.attach(accelerator or make_accelerator(self.config, self.output_dir))
        self.build_features(load_shared_base(self.family, self.config, self.accelerator))
        release_encoders([self])
        offload_idle_vae([self])
        self.start()
        return self

    def attach(self, accelerator) -> bool:
        """Takes the launch's accelerator: the seed, the data order and the step plan, then the output folder.
        Returns False, touching nothing, when the folder already holds this run finished."""
        cfg = self.config
        self.accelerator = acc = accelerator
        _check_topology(acc, cfg)
        self.seed = seed = self._shared_seed()
        self.weight_dtype = dtype_of(acc.mixed_precision)
        self.data = build_data(self.records, cfg, seed=seed, hf_dataset=self.hf_dataset, num_replicas=acc.num_processes,
                               rank=acc.process_index, pin_memory=acc.device.type == "cuda", targets=self.targets)
        self.batches_per_epoch = self.data.sampler.batches_per_replica()
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / cfg.gradient_accumulation_steps)
        self.max_train_steps = cfg.max_train_steps or cfg.num_train_epochs * self.updates_per_epoch
        self.num_epochs = math.ceil(self.max_train_steps / self.updates_per_epoch)
        if cfg.resume_from_checkpoint and self.finished_earlier():
            return False
        self._prepare_folder()
        return True

    def finished_earlier(self) -> bool:
        """The folder holds this run (same fingerprint) trained to its last step, its LoRA written."""
        try:
            summary = json.loads((self.output_dir / "run_summary.json").read_bytes())
        except (OSError, ValueError, RecursionError):
            return False
        return (isinstance(summary, dict) and summary.get("run_fingerprint") == self.identity.fingerprint
                and summary.get("global_step") == self.max_train_steps
                and (self.output_dir / LORA_WEIGHTS_NAME).is_file())

    def build_features(self, components: dict) -> None:
        """The run's objective, caches and validator over the launch's base (while its encoders are loaded)."""
        cfg, acc = self.config, self.accelerator
        self.components = components
        self.objective = self.family.training_objective(components, self.loss_settings)
        self.latent_norm = self.family.latent_norm(components["vae"].config)
        denoiser = components[self.family.denoiser_name]
        error = None
        with acc.main_process_first():  # the main process builds (or finds) each cache; the others read it
            try:  # caught here: raising inside would skip the main process's side of the barrier
                self.features = build_training_features(
                    self.family, components, self.data.dataset, self.records, cache_latents=cfg.cache_latents,
                    cache_text=cfg.cache_text_embeddings, cache_dir=Path(cfg.feature_cache_dir or self.output_dir / "cache"),
                    model_id=self.identity.settings["model"], dtype=self.weight_dtype, seed=self.seed, device=acc.device,
                    max_sequence_length=cfg.max_sequence_length, show_progress=acc.is_local_main_process)
            except INPUT_ERRORS as err:
                error = err
        self.validator = None
        if error is None and cfg.validation_prompts and acc.is_main_process:
            try:  # assembled now, while the text encoders are still loaded; it keeps the VAE for decoding
                self.validator = ValidationRunner(
                    self.family, components, denoiser, cfg.validation_prompts, num_images=cfg.num_validation_images,
                    seed=self.seed, resolution=self.validation_sizes, num_inference_steps=cfg.validation_inference_steps,
                    guidance_scale=cfg.validation_guidance_scale, max_sequence_length=cfg.max_sequence_length,
                    output_dir=self.output_dir, device=acc.device, dtype=self.weight_dtype,
                )
            except INPUT_ERRORS as err:
                error = err
        agree(acc, error)

    def start(self) -> None:
        """The LoRA on the shared denoiser, the optimizer and schedule, and the resumed state. Every random stream
        restarts from the run's seed here, so a run trains the same whether or not others ran before it."""
        error = None
        try:
            self._start()
        except INPUT_ERRORS as err:  # a checkpoint that does not fit, --lora_layers matching nothing
            error = err
        agree(self.accelerator, error)

    def _start(self) -> None:
        cfg, acc = self.config, self.accelerator
        set_seed(self.seed)
        denoiser = self.components[self.family.denoiser_name]
        if cfg.attention_backend:
            set_attention_backend(denoiser, cfg.attention_backend)
        self.lora_config = add_trainable_lora(denoiser, self.family, rank=cfg.rank, alpha=cfg.lora_alpha,
                                              dropout=cfg.lora_dropout, lora_layers=cfg.lora_layers, seed=self.seed,
                                              gradient_checkpointing=cfg.gradient_checkpointing,
                                              checkpointing_interval=cfg.gradient_checkpointing_interval,
                                              compile=cfg.compile, autocast=acc.native_amp)
        self.graphs_at_start = compiled_graphs()
        if self.compile_by_default:  # logged here: logging is set up with the accelerator
            logger.info("torch.compile on (the default for FLUX on a CUDA GPU; --no-compile turns it off)")
        if acc.scaler is not None:  # fp16: each run starts from a fresh loss scale, as a launch of its own does
            acc.scaler = get_grad_scaler(acc.distributed_type, **(acc.scaler_handler.to_kwargs()
                                                                   if acc.scaler_handler else {}))
        lr = cfg.learning_rate
        if cfg.scale_lr:
            lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * acc.num_processes
        self.denoiser, self.optimizer = acc.prepare(denoiser, build_optimizer(trainable_params(denoiser), cfg, lr))
        # Taken after prepare: a sharding wrapper (FSDP) replaces the parameters it shards.
        self.params = trainable_params(self.denoiser)
        if cfg.use_ema:
            named = [(n, p) for n, p in acc.unwrap_model(self.denoiser).named_parameters() if p.requires_grad]
            self.ema = LoraEMA(named, cfg.ema_decay)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg, self.max_train_steps)
        # The training stream (latent draws, noise, timesteps), checkpointed with the run; other noise on every process.
        self.generator = torch.Generator(device=acc.device).manual_seed(self.seed + acc.process_index)
        self.checkpointer = Checkpointer(acc, self.output_dir, self.identity, total_limit=cfg.checkpoints_total_limit)
        if self.resume_path is not None:
            self._resume()
        elif cfg.resume_from_checkpoint:
            log = logger.info if self.name else logger.warning  # a launch of several resumes whatever it can
            log("no complete checkpoint of this run in %s; starting a new run", self.output_dir)
        if self.global_step == 0 and acc.is_main_process:
            self.outputs.metrics.reset()  # this run's own start before its first checkpoint: the log starts over
        self._log_peak_estimate()
        if acc.is_main_process:
            acc.project_configuration.logging_dir = str(self.output_dir / cfg.logging_dir)
            flat = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
            acc.init_trackers("ddiff", config=flat)

    def _log_peak_estimate(self) -> None:
        """The step's estimated peak, before the first step (and a warning when it exceeds the GPU)."""
        cfg, acc = self.config, self.accelerator
        denoiser = acc.unwrap_model(self.denoiser)
        frames = [(b.height, b.width) for b in self.buckets] if self.buckets else [(cfg.resolution, cfg.resolution)]
        pixels = max(h * w for h, w in frames)
        interval = cfg.gradient_checkpointing_interval if cfg.gradient_checkpointing else 0
        self.peak_estimate = estimate_peak(
            self.components, denoiser, repeated_blocks(denoiser, self.family), tokens=pixels // 256 + cfg.max_sequence_length,
            batch=cfg.train_batch_size, checkpointing_interval=interval, weight_dtype=self.weight_dtype,
            eight_bit_adam=cfg.use_8bit_adam)
        logger.info("estimated peak memory of a step: %s", self.peak_estimate.describe())
        if acc.device.type == "cuda":
            total = torch.cuda.get_device_properties(acc.device).total_memory
            if self.peak_estimate.total > total:
                logger.warning("the estimate exceeds this GPU's %.1f GiB; %s", total / 2**30,
                               out_of_memory_advice(self.peak_estimate.total, total, cfg).split("; ", 1)[1])

    def _shared_seed(self) -> int:
        """The run's seed: the flag's; a resumed unseeded run keeps its first one; else one drawn and shared by every
        process."""
        if self.config.seed is not None:
            return self.config.seed
        if self.resume_manifest is not None:
            return self.resume_manifest["seed"]
        seed = [int(time.time_ns() % 2**31)]
        broadcast_object_list(seed)
        return seed[0]

    def _prepare_folder(self) -> None:
        """The main process clears an overwritten run's files, records this run's identity and the skipped images."""
        acc, error = self.accelerator, None
        if acc.is_main_process:
            try:
                self._write_start_files()
            except OSError as err:
                error = err
        agree(acc, error)

    def _write_start_files(self) -> None:
        cfg = self.config
        if cfg.overwrite_output_dir:
            removed = clear_run_outputs(self.output_dir, cfg.logging_dir)
            if removed:
                logger.warning("--overwrite_output_dir: removed %s from %s", ", ".join(removed), self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_run_file(self.output_dir, self.identity)
        if self.skipped:
            report = self.outputs.write_skipped(self.skipped)
            logger.warning("skipped %d unusable images; see %s", len(self.skipped), report)
        if self.targets:
            self._report_buckets()
        if self.holdout:
            write_holdout(self.output_dir / HOLDOUT_FILE, self.holdout)
            logger.info("%d images held out of training: %s", len(self.holdout), self.output_dir / HOLDOUT_FILE)

    def _report_buckets(self) -> None:
        report = bucket_report([r.size for r in self.records], [r.name for r in self.records], self.targets)
        path = self.outputs.write_buckets(report)
        lines = [f"{b['bucket']} ({b['ratio']:.2f}:1): {b['images']} images" for b in report["buckets"]]
        logger.info("aspect-ratio buckets (%s): %s", path, "; ".join(lines))
        if report["upscaled_beyond_limit"]:
            logger.warning("%d images are enlarged more than %.1fx to cover their bucket (see %s)",
                           report["upscaled_beyond_limit"], report["max_upscale"], path)

    def _resume(self) -> None:
        path = self.resume_path
        self.global_step = self.checkpointer.load(path, self.resume_manifest, model=self.denoiser, optimizer=self.optimizer,
                                                  lr_scheduler=self.lr_scheduler, training_generator=self.generator,
                                                  ema=self.ema)
        if self.accelerator.is_main_process:
            self.outputs.metrics.truncate_after(self.global_step)
        logger.info("resumed from %s at step %d", path, self.global_step)

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> None:
        acc, ga = self.accelerator, self.config.gradient_accumulation_steps
        if self.global_step >= self.max_train_steps:  # resumed from its last step: nothing left to train
            return
        progress = tqdm(total=self.max_train_steps, initial=self.global_step, desc="training",
                        disable=not acc.is_local_main_process)
        start_epoch = self.global_step // self.updates_per_epoch
        resume_batches = (self.global_step % self.updates_per_epoch) * ga
        self.denoiser.train()
        self._stop_signal = 0
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._loop(progress, start_epoch, resume_batches)
        except torch.cuda.OutOfMemoryError as err:
            device = acc.device
            raise OutOfMemory(out_of_memory_advice(torch.cuda.max_memory_allocated(device),
                                                   torch.cuda.get_device_properties(device).total_memory,
                                                   self.config)) from err
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            progress.close()
            if self.config.compile:  # bounded: one graph set per block class and frame, none per step
                logger.info("torch.compile: %d graphs compiled in this run", compiled_graphs() - self.graphs_at_start)
                if recompile_limit_hits():
                    logger.warning("torch.compile hit its recompile limit: some blocks ran uncompiled")

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum  # acted on after the current optimizer step

    def _loop(self, progress, start_epoch: int, resume_batches: int) -> None:
        cfg, acc = self.config, self.accelerator
        ga = cfg.gradient_accumulation_steps
        with self.profiler as profiler:
            for epoch in range(start_epoch, self.num_epochs):
                self.data.sampler.set_epoch(epoch, skip_batches=resume_batches if epoch == start_epoch else 0)
                position = self.data.sampler.skip
                group_losses, group_indices, step_start = [], [], time.perf_counter()
                for batch in self.data.loader:
                    group_start = position - position % ga
                    group_len = min(ga, self.batches_per_epoch - group_start)
                    last_in_group = position - group_start == group_len - 1
                    position += 1
                    # Gradients are all-reduced only on the micro-batch that ends an optimizer step.
                    with nullcontext() if last_in_group else acc.no_sync(self.denoiser):
                        loss = compute_loss(self.objective, self.denoiser, self.features, self.latent_norm, batch,
                                            self.generator, self.weight_dtype, autocast=acc.autocast())
                        acc.backward(loss / group_len)
                    group_losses.append(loss.detach())
                    group_indices += batch["indices"].tolist()
                    if not last_in_group:
                        continue
                    # One collective and one host-device sync per optimizer step: the loss for the log, and whether
                    # any process was asked to stop (all must stop at the same step).
                    agreed = acc.reduce(torch.stack([torch.stack(group_losses).mean().float(),
                                                     torch.full((), float(self._stop_signal), device=acc.device)]),
                                        reduction="sum")
                    agreed[0] /= acc.num_processes  # the mean loss, as reduce(..., "mean") computes it
                    step_loss, stop = agreed.tolist()
                    if not math.isfinite(step_loss):
                        self._non_finite(step_loss, group_indices)
                    if cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.update()
                    self.global_step += 1
                    profiler.step()
                    seconds = time.perf_counter() - step_start
                    self._log_step(step_loss, seconds, group_len * cfg.train_batch_size * acc.num_processes)
                    progress.update(1)
                    progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
                    self._after_step(stop > 0)
                    group_losses, group_indices, step_start = [], [], time.perf_counter()
                    if self.global_step >= self.max_train_steps:
                        break
                if self.global_step >= self.max_train_steps:
                    break
                if not cfg.validation_steps and (epoch + 1) % cfg.validation_epochs == 0:
                    self.validate()

    def _after_step(self, stop: bool) -> None:
        """Checkpoint, validation and a stop request (agreed by every process), at an optimizer-step boundary."""
        cfg = self.config
        if stop or self.global_step % cfg.checkpointing_steps == 0:
            self.checkpointer.save(self.global_step, model=self.denoiser, optimizer=self.optimizer,
                                   lr_scheduler=self.lr_scheduler, training_generator=self.generator, seed=self.seed,
                                   lora_params=self.params, ema=self.ema)
        if cfg.validation_steps and self.global_step % cfg.validation_steps == 0:
            self.validate()
        if stop:
            signum = self._stop_signal or signal.SIGTERM
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(signum).name} after step {self.global_step}; checkpoint written. Resume with "
                f"the same command plus --resume_from_checkpoint latest", signum)

    def _non_finite(self, loss: float, indices: list[int]) -> None:
        names = sorted({name for part in gather_object([[self.records[i].name for i in indices]]) for name in part})
        raise NonFiniteLoss(f"non-finite loss ({loss}) at step {self.global_step + 1}; stopped before the optimizer "
                            f"step; no checkpoint holds it. Files in that batch: {', '.join(names)}")

    def validate(self) -> None:
        """Validation images on the main process; the others wait."""
        if self.validator is not None:
            with self._validation_weights():
                self.validator.run(self.global_step, self.accelerator.trackers)
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def _validation_weights(self):
        """Validation's weights (the EMA with --validation_use_ema), run uncompiled: its shapes and no-grad mode
        would otherwise add graphs to the training ones."""
        denoiser = self.accelerator.unwrap_model(self.denoiser)
        vae = self.components.get("vae") if self.vae_offloaded else None
        if vae is not None:
            vae.to(self.accelerator.device)
        try:
            with (self.ema.swapped_in() if self.config.validation_use_ema else nullcontext()), \
                    blocks_uncompiled(denoiser, self.family):
                yield
        finally:
            if vae is not None:  # validation's memory goes back to the training level
                vae.to("cpu")
                torch.cuda.empty_cache()

    def _log_step(self, loss: float, seconds: float, samples: int) -> None:
        record = {"step": self.global_step, "loss": loss, "lr": self.lr_scheduler.get_last_lr()[0],
                  "step_time_s": seconds, "samples_per_s": samples / seconds}
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=self.global_step)
        if self.accelerator.is_main_process:
            self.outputs.metrics.append(record)

    # -- outputs -----------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Writes the LoRA, its model card and the run's config (main process only)."""
        acc = self.accelerator
        denoiser = acc.unwrap_model(self.denoiser)
        # Every process reports a digest of its LoRA; under DDP they must all be equal.
        digests = gather_object([lora_digest(lora_state_dict(denoiser))])
        if not acc.is_main_process:
            return None
        cfg = self.config
        if len(set(digests)) > 1:
            logger.error("LoRA weights differ between processes: %s", digests)
        weights = self.outputs.write_lora(self.family, denoiser, self.lora_config, kohya=cfg.lora_format == "kohya",
                                          ema=self.ema)
        if self.validator is not None:
            with self._validation_weights():
                self.validator.final_comparison()
        trigger = trigger_phrase([r.caption for r in self.records], cfg.instance_prompt)
        self.outputs.write_card(family=self.family, base_model=cfg.pretrained_model_name_or_path, trigger=trigger,
                                config_dict=cfg.to_dict(), lora_config=self.lora_config, global_step=self.global_step)
        self.outputs.write_config(cfg.to_dict())
        # Written last: a summary naming this run and its last step marks the run finished (a re-run skips it).
        summary = {"global_step": self.global_step, "run_fingerprint": self.identity.fingerprint,
                   "num_processes": acc.num_processes, "lora_sha256_per_process": digests,
                   "peak_memory_mb": peak_memory_mb(acc.device), "holdout": len(self.holdout),
                   "compiled_graphs": compiled_graphs() - self.graphs_at_start if cfg.compile else None,
                   "attention_backend": cfg.attention_backend or "native"}
        self.outputs.write_summary(summary)
        return weights

    def cleanup(self) -> None:
        """Flushes the trackers and takes the LoRA off the shared denoiser, leaving the base as it was loaded for
        the launch's next run. The process group lives to the end of the process (see ddiff_core.process)."""
        acc = self.accelerator
        for tracker in acc.trackers:
            tracker.finish()
        acc.trackers = []
        if getattr(self, "denoiser", None) is not None:
            acc.unwrap_model(self.denoiser, keep_fp32_wrapper=False)  # undoes prepare's autocast wrapper
        denoiser = getattr(self, "components", {}).get(self.family.denoiser_name) if hasattr(self, "family") else None
        if denoiser is not None:
            denoiser.__dict__.pop("_is_accelerate_prepared", None)  # or the next run's prepare would skip it
            try:
                remove_trainable_lora(denoiser, self.family)
            finally:  # diffusers' attention entries back, whatever happened (ddiff_cudnn borrows one)
                if self.config.attention_backend:
                    reset_attention_backend(denoiser)
        # The run's data (and its loader's workers), caches and validation pipeline go with it.
        self.denoiser = self.optimizer = self.params = self.ema = None
        self.data = self.features = self.validator = None
        acc.free_memory()

    def summary(self) -> str:
        peak = peak_memory_mb(self.accelerator.device)
        return (
            f"trained {self.global_step} steps; peak memory {peak:.0f} MiB\n"
            f"  LoRA:        {self.output_dir / 'pytorch_lora_weights.safetensors'}\n"
            f"  model card:  {self.output_dir / 'README.md'}\n"
            f"  metrics:     {self.outputs.metrics.path}\n"
            f"  TensorBoard: tensorboard --logdir {self.output_dir / self.config.logging_dir}"
        )
