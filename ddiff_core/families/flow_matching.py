"""What the rectified-flow families (FLUX, SD3) share: the double-stream LoRA targets, timestep sampling on the
scheduler's grid, the straight noising path, the velocity loss, and the per-run objective that ties them together."""

from __future__ import annotations

from abc import abstractmethod

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ddiff_core.config import LossSettings
from ddiff_core.families.base import ModelFamily, TrainingObjective

# Every linear layer of a double-stream (MM-DiT) block: image-stream and text-stream attention and feed-forward.
DOUBLE_STREAM_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
ATTENTION_TARGETS = DOUBLE_STREAM_TARGETS[:4]


class FlowMatchingSampler:
    """Samples timesteps/sigmas on the scheduler's training grid, as the upstream examples do."""

    def __init__(self, scheduler_config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        # A private copy: validation calls set_timesteps on the pipeline's scheduler.
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.timesteps = scheduler.timesteps.clone()
        self.sigmas = scheduler.sigmas.clone()
        self._on_device: tuple[torch.Tensor, torch.Tensor] | None = None

    def sample(self, batch_size: int, generator: torch.Generator, settings: LossSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(timesteps, sigmas)`` for a batch, on the generator's device. The grid is looked up there too:
        bringing the indices to the host would make it wait for the GPU at every micro-batch."""
        device = generator.device
        u = compute_density_for_timestep_sampling(
            settings.weighting_scheme, batch_size, logit_mean=settings.logit_mean, logit_std=settings.logit_std,
            mode_scale=settings.mode_scale, device=device, generator=generator,
        )
        indices = (u * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1)
        if self._on_device is None or self._on_device[0].device != indices.device:
            self._on_device = (self.timesteps.to(indices.device), self.sigmas.to(indices.device))
        timesteps, sigmas = self._on_device
        return timesteps[indices], sigmas[indices]


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The point on the straight path from data (sigma 0) to noise (sigma 1)."""
    sigmas = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - sigmas) * latents + sigmas * noise


def flow_matching_loss(
    model_pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, weighting_scheme: str
) -> torch.Tensor:
    """Weighted MSE between the predicted and the true velocity ``noise - latents``, in fp32."""
    target = noise - latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas.float()).view(-1, *([1] * (latents.ndim - 1)))
    error = weighting * (model_pred.float() - target.float()) ** 2
    return error.reshape(latents.shape[0], -1).mean(dim=1).mean()


class FlowMatchingObjective(TrainingObjective):
    """One run's rectified-flow loss: noise, then timesteps from the run's own sampler, then the family's velocity."""

    def __init__(self, family: "FlowMatchingFamily", scheduler_config, settings: LossSettings):
        self.family, self.settings = family, settings
        self.sampler = FlowMatchingSampler(scheduler_config)

    def loss(self, denoiser, latents, embeds, generator, conditioning=None):
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps, sigmas = self.sampler.sample(latents.shape[0], generator, self.settings)
        pred = self.family.predict_velocity(denoiser, noisy_latents(latents, noise, sigmas), timesteps, embeds,
                                            self.settings)
        return flow_matching_loss(pred, latents, noise, sigmas, self.settings.weighting_scheme)


class FlowMatchingFamily(ModelFamily):
    """A rectified-flow family: it says how its denoiser predicts the velocity; the rest is shared."""

    resolution_multiple = 16  # 8x VAE, then 2x2 patches or packing

    def training_objective(self, components, settings):
        return FlowMatchingObjective(self, components["scheduler"].config, settings)

    def prompt_kwargs(self, max_sequence_length):
        return {"max_sequence_length": max_sequence_length}

    @abstractmethod
    def predict_velocity(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: dict,
                         settings: LossSettings) -> torch.Tensor:
        """The denoiser's velocity prediction for ``noisy`` latents, in the latents' own layout."""
