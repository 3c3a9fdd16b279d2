import torch

from ddiff_core.latents import LatentNorm, sample_latents


def test_shift_scale_round_trip_and_values():
    norm = LatentNorm.from_vae_config({"scaling_factor": 0.3611, "shift_factor": 0.1159})
    x = torch.randn(2, 16, 4, 4)
    assert torch.allclose(norm.normalize(x), (x - 0.1159) * 0.3611)
    assert torch.allclose(norm.denormalize(norm.normalize(x)), x, atol=1e-6)


def test_scale_only_config_has_no_shift():
    norm = LatentNorm.from_vae_config({"scaling_factor": 0.18215, "shift_factor": None})
    x = torch.randn(1, 4, 2, 2)
    assert torch.allclose(norm.normalize(x), x * 0.18215)


def test_per_channel_mean_std():
    norm = LatentNorm.from_vae_config({"scaling_factor": 1.0, "latents_mean": [1.0, -1.0], "latents_std": [2.0, 4.0]})
    x = torch.zeros(1, 2, 1, 1)
    assert torch.allclose(norm.normalize(x).flatten(), torch.tensor([-0.5, 0.25]))
    assert torch.allclose(norm.denormalize(norm.normalize(x)), x)


def test_sample_latents_is_seeded_and_uses_std():
    params = torch.cat([torch.ones(1, 2, 3, 3), torch.full((1, 2, 3, 3), -60.0)], dim=1)  # tiny std
    assert torch.allclose(sample_latents(params, torch.Generator().manual_seed(0)), torch.ones(1, 2, 3, 3), atol=1e-6)
    wide = torch.cat([torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)], dim=1)
    a = sample_latents(wide, torch.Generator().manual_seed(1))
    assert torch.equal(a, sample_latents(wide, torch.Generator().manual_seed(1)))
    assert a.std() > 0.3
