"""The one VAE latent normalization: shift and scale (or per-channel mean/std), and its inverse."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentNorm:
    """How a VAE's raw latents map to the space the denoiser was trained in.

    ``normalize(x) = (x - shift) * scale`` where shift/scale are scalars, or per-channel
    ``(x - mean) * scale / std`` for VAEs whose config carries ``latents_mean``/``latents_std``.
    """

    scale: float
    shift: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def from_vae_config(cls, config) -> "LatentNorm":
        """Reads ``scaling_factor`` and, when present, ``shift_factor`` or ``latents_mean``/``latents_std``."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        mean, std = get("latents_mean", None), get("latents_std", None)
        return cls(
            scale=float(get("scaling_factor", 1.0)),
            shift=float(get("shift_factor", None) or 0.0),
            mean=tuple(mean) if mean is not None else None,
            std=tuple(std) if std is not None else None,
        )

    def _channel_stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (latents.ndim - 2)
        mean = torch.tensor(self.mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(self.std, device=latents.device, dtype=latents.dtype).view(shape)
        return mean, std

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> denoiser space."""
        if self.mean is not None and self.std is not None:
            mean, std = self._channel_stats(latents)
            return (latents - mean) * self.scale / std
        return (latents - self.shift) * self.scale

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser space -> raw VAE latents (the exact inverse of :meth:`normalize`)."""
        if self.mean is not None and self.std is not None:
            mean, std = self._channel_stats(latents)
            return latents * std / self.scale + mean
        return latents / self.scale + self.shift


def sample_latents(dist_params: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draws raw latents from a VAE's diagonal Gaussian, given its ``[mean, logvar]`` parameters (dim 1).

    The same draw is used whether the parameters come from the encoder or from the latent cache,
    so caching does not change what the model trains on.
    """
    mean, logvar = torch.chunk(dist_params, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * noise
