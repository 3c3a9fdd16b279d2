import json

import torch
from diffusers import FluxPipeline

from ddiff_core.families import resolve_family
from ddiff_core.tiny import build_tiny_pipeline, main


def test_tiny_flux_loads_with_stock_pipeline_and_generates(tiny_flux):
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    assert json.loads((tiny_flux / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert pipe.vae.config.shift_factor != 0 and pipe.vae.config.scaling_factor != 1
    image = pipe("a <demo-style> cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert resolve_family(tiny_flux).name == "flux"


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (build_tiny_pipeline("flux", "tiny", seed) for seed in (3, 3, 4))
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), name


def test_small_size_is_benchmark_sized():
    pipe = build_tiny_pipeline("flux", "small", 0)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    assert 15e6 <= params <= 25e6


def test_cli_saves_a_loadable_folder(tmp_path, capsys):
    assert main(["--family", "flux", "--output_dir", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert "saved" in capsys.readouterr().out
    FluxPipeline.from_pretrained(tmp_path / "m")
