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


def load_base(family, path: str, *, dtype: torch.dtype, device, revision: str | None = None,
              variant: str | None = None) -> dict:
    """The family's components (frozen, eval mode) in ``dtype`` on ``device``."""
    components = family.load_components(path, revision=revision, variant=variant, dtype=dtype)
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.to(device)
    return components


def add_trainable_lora(denoiser, family, *, rank: int, alpha: int, dropout: float, lora_layers: str | None, seed: int,
                       gradient_checkpointing: bool = False) -> LoraConfig:
    """Adds the LoRA (its initial weights depend on ``seed`` alone), in fp32 whatever the frozen weights' dtype."""
    torch.manual_seed(seed)
    config = add_lora(denoiser, family, rank=rank, alpha=alpha, dropout=dropout, lora_layers=lora_layers)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    for param in trainable_params(denoiser):
        param.data = param.data.float()
    return config


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
    """AdamW or Prodigy over ``params``, at ``lr`` (default ``--learning_rate``).

    Raises:
        ConfigError: Prodigy without its package.
    """
    lr = config.learning_rate if lr is None else lr
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError as err:
            raise ConfigError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from err
        optimizer = prodigyopt.Prodigy(params, lr=lr, betas=betas, weight_decay=config.adam_weight_decay,
                                       eps=config.adam_epsilon)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=config.adam_weight_decay,
                                      eps=config.adam_epsilon)
    return optimizer


def build_lr_scheduler(optimizer, config: TrainConfig, max_train_steps: int):
    """The LR schedule, stepped once per optimizer step on every process (not prepared: a prepared scheduler
    steps once per process, accelerate #2142)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=max_train_steps, num_cycles=config.lr_num_cycles, power=config.lr_power)
