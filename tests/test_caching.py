import torch
from diffusers import FluxPipeline

from ddiff_core.caching import FeatureCache, build_latent_cache, build_text_cache
from ddiff_core.data import EpochBatchSampler
from ddiff_core.data import ImageCaptionDataset, load_records, screen_records
from ddiff_core.families import get_family
from ddiff_core.latents import sample_latents


def test_text_cache_is_keyed_by_record_index_under_shuffling(tiny_flux, tmp_path):
    """diffusers #14430: reading a cache by step number pairs latents with the wrong captions once shuffled."""
    family = get_family("flux")
    components = dict(FluxPipeline.from_pretrained(tiny_flux).components)
    captions = [f"<tok> still number {i}" for i in range(6)] + ["<tok> still number 0"]  # one duplicate caption
    cache = build_text_cache(family, components, captions, tmp_path / "t.safetensors", "k", device="cpu",
                             max_sequence_length=32, show_progress=False)
    sampler = EpochBatchSampler(len(captions), 3, seed=0)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for batch in sampler:
            fresh = family.encode_prompts(components, [captions[i] for i in batch], device="cpu", max_sequence_length=32)
            looked_up = cache.lookup(torch.tensor(batch))
            for name in fresh:
                torch.testing.assert_close(looked_up[name], fresh[name], msg=lambda m: f"{epoch} {batch} {name}: {m}")


def test_cache_is_reused_only_for_the_same_fingerprint(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"x": list(torch.arange(6.0).view(3, 2))}

    path = tmp_path / "c.safetensors"
    first = FeatureCache.load_or_build(path, "key-a", 3, build)
    again = FeatureCache.load_or_build(path, "key-a", 3, build)
    assert len(calls) == 1 and again.reused and not first.reused
    assert torch.equal(again.lookup(torch.tensor([2, 0]))["x"], torch.tensor([[4.0, 5.0], [0.0, 1.0]]))
    FeatureCache.load_or_build(path, "key-b", 3, build)
    assert len(calls) == 2
    path.write_bytes(b"garbage")  # a corrupt cache is rebuilt, not trusted
    assert not FeatureCache.load_or_build(path, "key-b", 3, build).reused and len(calls) == 3
    assert not list(tmp_path.glob(".*tmp"))


def test_each_latent_cache_row_is_a_fresh_encode_of_its_own_image(tiny_flux, tmp_path):
    """The cache encodes in batches of 4, training would encode one batch at a time: each row must equal a fresh
    single-image encode (to float tolerance: kernels sum in a batch-size-dependent order), and the same seeded draw
    from either gives the same latents."""
    from types import SimpleNamespace

    from .conftest import DEMO_DATA

    family = get_family("flux")
    vae = FluxPipeline.from_pretrained(tiny_flux).vae
    records, _ = load_records(SimpleNamespace(instance_data_dir=str(DEMO_DATA), dataset_name=None,
                                              caption_column=None, instance_prompt=None))
    records, _ = screen_records(records[:6])
    dataset = ImageCaptionDataset(records, resolution=64, seed=3, random_flip=True, with_pixels=False)
    cache = build_latent_cache(family, vae, dataset, tmp_path / "l.safetensors", "k", show_progress=False)
    for i in range(len(records)):
        fresh = family.encode_images(vae, dataset.pixels(i)[None]).float()
        cached = cache.lookup(torch.tensor([i]))["latent_dist"]
        torch.testing.assert_close(cached, fresh)
        draws = [sample_latents(p, torch.Generator().manual_seed(i)) for p in (cached, fresh)]
        torch.testing.assert_close(draws[0], draws[1])
