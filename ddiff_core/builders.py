"""One builder per part of a training run (the frozen base, the LoRA, the data, the optimizer and its schedule),
used alike by the trainer, the benchmarks and the tests, so that a benchmark times ddiff's own code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig

from ddiff_core.buckets import Bucket
from ddiff_core.config import ConfigError, TrainConfig
from ddiff_core.data import EpochBatchSampler, ImageCaptionDataset, Record, collate
from ddiff_core.lora import add_lora
from ddiff_core.speed import (checkpoint_blocks, compile_blocks, skip_lora_input_casts, uncheckpoint_blocks,
                              uncompile_blocks)


def load_base(family, path: str, *, dtype: torch.dtype, device, revision: str | None = None,
              variant: str | None = None, quantization: str = "none", bnb_config_path: str | None = None) -> dict:
    """The family's components (frozen, eval mode) in ``dtype`` on ``device``; the denoiser's weights quantized
    (``int8``, ``fp8``, ``nf4``; see ddiff_core.quantization) when asked."""
    from ddiff_core.quantization import follow_autocast, pipeline_quantization

    config = pipeline_quantization(quantization, family.denoiser_name, dtype, bnb_config_path)
    components = family.load_components(path, revision=revision, variant=variant, dtype=dtype,
                                        quantization_config=config)
    for name, module in components.items():
        if isinstance(module, torch.nn.Module) and not (name == family.denoiser_name and quantization == "nf4"):
            module.to(device)  # bitsandbytes places its 4-bit weights on the GPU itself and refuses a move
    if config is not None:
        follow_autocast(components[family.denoiser_name])
    return components


def add_trainable_lora(denoiser, family, *, rank: int, alpha: int, dropout: float, lora_layers: str | None, seed: int,
                       gradient_checkpointing: bool = False, checkpointing_interval: int = 1,
                       compile: bool = False, autocast: bool | None = None) -> LoraConfig:
    """Adds the LoRA (its initial weights depend on ``seed`` alone), in fp32 whatever the frozen weights' dtype; then
    gradient checkpointing (every block, or every ``checkpointing_interval``-th repeated block) and regional
    compilation, in that order, so each compiled block holds its LoRA. When the step runs under ``autocast`` (None:
    whenever the frozen weights are bf16/fp16, as ddiff runs them), peft's exact round-trip casts of the LoRA inputs
    are skipped (``skip_lora_input_casts``)."""
    torch.manual_seed(seed)
    config = add_lora(denoiser, family, rank=rank, alpha=alpha, dropout=dropout, lora_layers=lora_layers)
    for param in trainable_params(denoiser):
        param.data = param.data.float()
    if autocast is not False:
        skip_lora_input_casts(denoiser)
    if gradient_checkpointing and checkpointing_interval == 1:
        denoiser.enable_gradient_checkpointing()
    elif gradient_checkpointing:
        checkpoint_blocks(denoiser, family, every=checkpointing_interval)
    if compile:
        compile_blocks(denoiser, family)
    return config


def remove_trainable_lora(denoiser, family) -> None:
    """Undoes :func:`add_trainable_lora`: the denoiser as it was loaded (frozen, eval mode, uncompiled)."""
    uncompile_blocks(denoiser, family)
    uncheckpoint_blocks(denoiser, family)
    if getattr(denoiser, "is_gradient_checkpointing", False):
        denoiser.disable_gradient_checkpointing()
    if getattr(denoiser, "peft_config", None) or getattr(denoiser, "_hf_peft_config_loaded", False):
        denoiser.unload_lora()
    denoiser.eval()


def trainable_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@dataclass
class TrainingData:
    dataset: ImageCaptionDataset
    sampler: EpochBatchSampler
    loader: torch.utils.data.DataLoader


def build_data(records: list[Record], config: TrainConfig, *, seed: int, hf_dataset=None, num_replicas: int = 1,
               rank: int = 0, pin_memory: bool = False, targets: list[Bucket] | None = None) -> TrainingData:
    """The dataset (pixels only when latents are not cached; each record in its bucket ``targets`` when given), its
    resumable per-epoch batch order (one bucket per batch), and the loader."""
    frames = [(b.height, b.width) for b in targets] if targets else None
    dataset = ImageCaptionDataset(
        records, resolution=config.resolution, center_crop=config.center_crop, random_flip=config.random_flip,
        seed=seed, repeats=config.repeats, dataset=hf_dataset, image_column=config.image_column,
        with_pixels=not config.cache_latents, targets=frames,
    )
    group_of = {frame: i for i, frame in enumerate(sorted(set(dataset.targets)))}
    groups = [group_of[dataset.targets[dataset.record_index(i)]] for i in range(len(dataset))]
    sampler = EpochBatchSampler(len(dataset), config.train_batch_size, seed=seed, num_replicas=num_replicas, rank=rank,
                                groups=groups)
    workers = config.dataloader_num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=workers > 0,
        # Its own generator: creating an iterator each epoch must not draw from the global RNG (dropout's),
        # or a run resumed mid-epoch would see different dropout masks.
        generator=torch.Generator().manual_seed(seed),
    )
    return TrainingData(dataset, sampler, loader)


def build_optimizer(params, config: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW (8-bit states with ``--use_8bit_adam``) or Prodigy over ``params``, at ``lr`` (default
    ``--learning_rate``).

    Raises:
        ConfigError: Prodigy or 8-bit Adam without its package.
    """
    lr = config.learning_rate if lr is None else lr
    betas = (config.adam_beta1, config.adam_beta2)
    if config.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as err:
            raise ConfigError("--use_8bit_adam needs bitsandbytes: pip install 'ddiff[quant]'") from err
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=config.adam_weight_decay,
                                            eps=config.adam_epsilon)
    if config.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError as err:
            raise ConfigError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from err
        optimizer = prodigyopt.Prodigy(params, lr=lr, betas=betas, weight_decay=config.adam_weight_decay,
                                       eps=config.adam_epsilon)
    else:
        params = list(params)
        # Fused on CUDA: one kernel for all parameters instead of a loop of small ones (same maths, same state).
        fused = bool(params) and all(p.device.type == "cuda" for p in params)
        optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=config.adam_weight_decay,
                                      eps=config.adam_epsilon, fused=fused or None)
    return optimizer


def build_lr_scheduler(optimizer, config: TrainConfig, max_train_steps: int):
    """The LR schedule, stepped once per optimizer step on every process (not prepared: a prepared scheduler
    steps once per process, accelerate #2142)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=max_train_steps, num_cycles=config.lr_num_cycles, power=config.lr_power)
