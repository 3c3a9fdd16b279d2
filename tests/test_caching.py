import torch
from diffusers import FluxPipeline

from ddiff_core.caching import FeatureCache, build_text_cache
from ddiff_core.data import EpochBatchSampler
from ddiff_core.families import get_family


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
                assert torch.allclose(fresh[name], looked_up[name], atol=1e-5), (epoch, batch, name)


def test_cache_is_reused_only_for_the_same_fingerprint(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(6.0).view(3, 2)}

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
