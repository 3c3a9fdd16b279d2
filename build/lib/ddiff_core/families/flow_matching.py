"""Rectified-flow training maths shared by the flow-matching families (FLUX, SD3)."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3


class FlowMatchingSampler:
    """Samples timesteps/sigmas on the scheduler's training grid, as the upstream examples do."""

    def __init__(self, scheduler_config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        # A private copy: validation calls set_timesteps on the pipeline's scheduler.
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.timesteps = scheduler.timesteps.clone()
        self.sigmas = scheduler.sigmas.clone()

    def sample(self, batch_size: int, generator: torch.Generator, config) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(timesteps, sigmas)`` for a batch, on the generator's device."""
        device = generator.device
        u = compute_density_for_timestep_sampling(
            config.weighting_scheme,
            batch_size,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            mode_scale=config.mode_scale,
            device=device,
            generator=generator,
        )
        indices = (u * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1).cpu()
        return self.timesteps[indices].to(device), self.sigmas[indices].to(device)


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
