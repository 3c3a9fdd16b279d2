"""ValidationRunner: in-memory components, one batched call, fixed seeds, training state untouched, no leak."""

import gc

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from ddiff_core.families import get_family
from ddiff_core.lora import add_lora
from ddiff_core.validation import ValidationRunner


def _live_tensor_bytes() -> int:
    gc.collect()
    total = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                total += obj.untyped_storage().nbytes()
        except Exception:
            pass
    return total


@pytest.fixture
def runner(tiny_flux, tmp_path, monkeypatch):
    family = get_family("flux")
    components = family.load_components(str(tiny_flux))
    denoiser = components["transformer"]
    torch.manual_seed(0)
    add_lora(denoiser, family, rank=4, alpha=4, dropout=0.1, lora_layers=None)
    with torch.no_grad():  # a LoRA that does something, so "adapter off" differs from "on"
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    denoiser.train()
    run = ValidationRunner(family, components, denoiser, ["<demo-style> a cat", "<demo-style> a rocket"], num_images=2,
                           seed=7, resolution=64, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=32,
                           output_dir=tmp_path, device="cpu", dtype=torch.float32)

    def no_loading(*args, **kwargs):
        raise AssertionError("validation must not load a pipeline")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_loading)
    monkeypatch.setattr(FluxPipeline, "from_pretrained", no_loading)
    return run, components, denoiser


def test_pipeline_is_assembled_once_from_the_modules_in_memory(runner):
    run, components, denoiser = runner
    assert run.pipeline.transformer is denoiser and run.pipeline.vae is components["vae"]
    assert run.pipeline.text_encoder is None and run.pipeline.text_encoder_2 is None  # prompts were encoded once
    calls = []
    original = type(run.pipeline).__call__
    type(run.pipeline).__call__ = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        images = run.generate()
    finally:
        type(run.pipeline).__call__ = original
    assert len(images) == 4 and len(calls) == 1  # one batched call for 2 prompts x 2 images


def test_batched_equals_one_by_one_and_seeds_repeat(runner):
    run, _, _ = runner
    batched = [torch.tensor(list(i.getdata()), dtype=torch.float32) for i in run.generate()]
    single = [torch.tensor(list(i.getdata()), dtype=torch.float32) for i in run.generate(batched=False)]
    again = [torch.tensor(list(i.getdata()), dtype=torch.float32) for i in run.generate()]
    for a, b, c in zip(batched, single, again):
        assert (a - b).abs().max() <= 2  # same seeds -> same images, up to rounding to 8 bits
        assert torch.equal(a, c)
    assert any(not torch.equal(batched[0], x) for x in batched[1:])  # one generator per image, not one seed


def test_training_state_is_restored_exactly(runner):
    run, _, denoiser = runner
    rng_before = torch.get_rng_state()
    run.generate()
    base = run.generate(lora=False)
    assert denoiser.training  # back in train mode
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training stream's RNG is untouched
    lora = run.generate()
    assert any(a.tobytes() != b.tobytes() for a, b in zip(base, lora))  # the adapter is active again
    assert all(p.requires_grad for n, p in denoiser.named_parameters() if "lora_" in n)


def test_memory_returns_to_where_it_was_over_five_validations(runner):
    run, _, _ = runner
    run.run(step=0)
    after_first = _live_tensor_bytes()
    for step in range(1, 6):
        path, = run.run(step=step)
    growth = _live_tensor_bytes() - after_first
    assert growth <= 256 * 1024, f"live tensors grew by {growth} bytes over 5 validations"
    assert path.name == "step-000005.png" and path.exists()
    assert all(p.exists() for p in run.final_comparison())


def test_fp16_validation_decodes_with_the_vae_kept_in_fp32(tiny_flux, tmp_path):
    # A VAE that overflows in fp16 (force_upcast, as SDXL's) stays in fp32; the denoiser's steps run under fp16
    # autocast, the decode must not: under autocast its convolutions would run in fp16 again.
    family = get_family("flux")
    components = family.load_components(str(tiny_flux), dtype=torch.float16)
    vae, denoiser = components["vae"], components["transformer"]
    assert vae.dtype == torch.float32 and vae.config.force_upcast
    add_lora(denoiser, family, rank=4, alpha=4, dropout=0.0, lora_layers=None)
    run = ValidationRunner(family, components, denoiser, ["<demo-style> a cat"], num_images=1, seed=7, resolution=64,
                           num_inference_steps=1, guidance_scale=3.5, max_sequence_length=32, output_dir=tmp_path,
                           device="cpu", dtype=torch.float16)
    dtypes = {}

    def record(stage):
        def hook(module, inputs, output):
            dtypes.setdefault(stage, output.dtype)
        return hook

    hooks = [vae.decoder.conv_out.register_forward_hook(record("decode")),
             denoiser.proj_out.register_forward_hook(record("denoise"))]
    try:
        image, = run.generate()
    finally:
        for hook in hooks:
            hook.remove()
    assert dtypes == {"denoise": torch.float16, "decode": torch.float32}
    assert image.size == (64, 64)
