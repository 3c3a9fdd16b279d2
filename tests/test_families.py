"""Every registered family (and FLUX.1-schnell) through the same tests: tiny build, training with and without
caches, exact resume, the stock pipeline loading the LoRA; plus a third-party family from an entry point."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from safetensors.torch import load_file

from ddiff_core.families import available_families, get_family, resolve_family
from ddiff_core.tiny import TINY_BUILDERS, save_tiny_pipeline

from .conftest import (REPO, assert_resume_from_copy_is_exact, assert_same_training, initial_lora, run_main,
                       run_script, train_args)

# Every built-in family with a tiny builder (a third party's family needs none), and FLUX.1-schnell.
CASES = [(name, None) for name in TINY_BUILDERS] + [("flux", "schnell")]
IDS = [f"{n}-{v}" if v else n for n, v in CASES]
# FLUX.1-dev itself trains and resumes in depth in test_train.py and test_resume.py; these train the others.
OTHERS = [(case, id_) for case, id_ in zip(CASES, IDS) if case != ("flux", None)]
trains_others = pytest.mark.parametrize("family_model", [c for c, _ in OTHERS], ids=[i for _, i in OTHERS], indirect=True)


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def family_model(request, tmp_path_factory):
    name, variant = request.param
    path = save_tiny_pipeline(name, tmp_path_factory.mktemp("models") / f"tiny-{name}", "tiny", 0, variant)
    return name, variant, path


def test_family_is_detected_from_model_index(family_model):
    name, _, path = family_model
    assert resolve_family(path).name == name
    assert set(TINY_BUILDERS) <= set(available_families())


@trains_others
def test_cached_and_uncached_train_the_same_lora_and_it_loads(family_model, tmp_path):
    name, variant, path = family_model
    common = ["--max_train_steps", "6", "--learning_rate", "1e-2", "--validation_prompt", "<demo-style> a cat",
              "--num_validation_images", "2", "--validation_steps", "6", "--validation_inference_steps", "2"]
    run_script("train_lora.py", train_args(path, tmp_path / "cached", *common, "--cache_latents"))
    run_script("train_lora.py", train_args(path, tmp_path / "fresh", *common, "--no-cache_text_embeddings"))
    assert_same_training(tmp_path / "cached", tmp_path / "fresh", initial_lora(path, name))
    assert (tmp_path / "cached" / "validation" / "final-base-vs-lora.png").exists()

    family = get_family(name)
    pipe = family.pipeline_class.from_pretrained(path)
    kwargs = dict(prompt="<demo-style> a cat", height=64, width=64, num_inference_steps=2, output_type="pt")
    if name in ("flux", "sd3"):
        kwargs["max_sequence_length"] = 32
    base = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(tmp_path / "cached")
    assert (base - pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images).abs().max() > 1e-4


@trains_others
def test_resume_from_a_checkpoint_is_exact(family_model, tmp_path):
    _, _, path = family_model
    assert_resume_from_copy_is_exact(path, tmp_path, [
        "--max_train_steps", "6", "--checkpointing_steps", "3", "--gradient_accumulation_steps", "2",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--learning_rate", "1e-3"])


class _HostReads(TorchDispatchMode):
    """Records the ops that bring a value back to the host (on a GPU each one waits for the queued work)."""

    OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default, torch.ops.aten.equal.default,
           torch.ops.aten.masked_select.default, torch.ops.aten.masked_scatter.default,
           torch.ops.aten.unique_consecutive.default, torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default,
           torch.ops.aten.repeat_interleave.Tensor, torch.ops.aten.bincount.default, torch.ops.aten.histc.default}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_micro_batch_reads_no_value_back_to_the_host(family_model):
    """The training loss and its backward (what runs per micro-batch) never ask for a value (item(), nonzero, ...):
    only the loop's one read per optimizer step, for the log, may wait for the GPU. On a CPU, copies between host
    and device cannot be seen; the GPU benchmark counts every wait (torch's sync debug mode)."""
    from ddiff_core.builders import add_trainable_lora

    name, _, path = family_model
    family = get_family(name)
    components = family.load_components(str(path))
    objective = family.training_objective(components, family.loss_settings())
    denoiser = components[family.denoiser_name]
    add_trainable_lora(denoiser, family, rank=4, alpha=4, dropout=0.0, lora_layers=None, seed=0)
    embeds = family.encode_prompts(components, ["a cat", "a dog"], device="cpu", max_sequence_length=32)
    latents = torch.randn(2, components["vae"].config.latent_channels, 8, 8)
    with _HostReads() as reads:
        objective.loss(denoiser, latents, embeds, torch.Generator().manual_seed(0)).backward()
    assert reads.calls == []


@pytest.mark.parametrize("family_model", [
    pytest.param(("sd3", None), id="sd3"),  # its block class is named by ddiff's plugin
    pytest.param(("sdxl", None), id="sdxl"),
    pytest.param(("sd15", None), id="sd15", marks=pytest.mark.slow),  # the UNet's blocks again, as in SDXL
], indirect=True)
def test_compiled_training_matches_eager(family_model, tmp_path):
    """Regional compilation of each family's repeated blocks (FLUX's is tested in depth in test_speed.py)."""
    name, _, model = family_model
    args = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--cache_latents"]
    run_script("train_lora.py", train_args(model, tmp_path / "eager", *args, "--no-compile"))
    run_script("train_lora.py", train_args(model, tmp_path / "compiled", *args, "--compile"))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("eager", "compiled")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=0)
    assert json.loads((tmp_path / "compiled" / "run_summary.json").read_text())["compiled_graphs"] > 0


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_kohya_copy_loads_and_matches_the_diffusers_copy(name, tmp_path):
    path = save_tiny_pipeline(name, tmp_path / "model")
    out = tmp_path / "lora"
    run_script("train_lora.py", train_args(path, out, "--max_train_steps", "4", "--rank", "4", "--lora_alpha", "8",
                                           "--learning_rate", "5e-2", "--lora_format", "kohya", "--snr_gamma", "5"))
    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")
    assert any(k.startswith("lora_unet_") for k in kohya)
    assert all(v.item() == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))  # the real alpha, not the rank
    pipe = get_family(name).pipeline_class.from_pretrained(path)
    kwargs = dict(prompt="a cat", height=64, width=64, num_inference_steps=2, output_type="pt")
    base = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(out)
    a = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    change = (a - base).abs().max()
    assert change > 1e-3  # a LoRA that does something: a wrong alpha would show below
    pipe.unload_lora_weights()
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights_kohya.safetensors")
    kohya_images = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (kohya_images - a).abs().max() < change / 100  # same strength as the diffusers copy


def test_family_specific_flags_are_refused_elsewhere(tiny_flux, tmp_path, capsys):
    result = run_script("train_lora.py", train_args(tiny_flux, tmp_path / "o", "--snr_gamma", "5"), check=False)
    assert result.returncode == 2 and "--snr_gamma" in result.stderr.strip().splitlines()[-1]  # the real process
    for flag, value in [("--lora_format", "kohya"), ("--noise_offset", "0.1")]:
        code, stderr = run_main("train_lora.py", train_args(tiny_flux, tmp_path / "o", flag, value), capsys)
        assert code == 2 and flag in stderr.strip().splitlines()[-1]


def _plugin_site(root, name="flux-copy", extra=""):
    """An installed distribution (dist-info with an entry point) that registers a family, on a path of its own."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ddiff_plugin_family.py").write_text(
        "from ddiff_core.families.flux import FluxFamily\n\n"
        "class CopyFamily(FluxFamily):\n"
        f"    name = {name!r}\n"
        "    pipeline_class_names = ('FluxCopyPipeline',)\n")
    dist = root / "ddiff_plugin_family-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ddiff-plugin-family\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[ddiff.families]\n{name} = ddiff_plugin_family:CopyFamily\n{extra}")
    return root


def test_a_third_party_family_is_picked_up_from_its_entry_point(tiny_flux, tmp_path):
    site = _plugin_site(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    code = "from ddiff_core.families import available_families, get_family; print(available_families(), get_family('flux-copy').name)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert "flux-copy" in out.stdout, out.stderr[-2000:]
    result = subprocess.run([sys.executable, str(REPO / "scripts/train_lora.py"),
                             *train_args(tiny_flux, tmp_path / "o", "--model_family", "flux-copy", "--max_train_steps", "2")],
                            env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    dup = _plugin_site(tmp_path / "dup", name="flux")
    env["PYTHONPATH"] = os.pathsep.join([str(dup), str(REPO)])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "registered twice" in out.stderr


def test_validation_images_are_the_stock_pipelines(family_model, tmp_path):
    # ddiff's validation assembles the pipeline from the modules in memory and encodes the prompts once; what it
    # draws must be what the stock pipeline loaded from the folder draws for the same prompt, seed and settings
    # (SDXL guides away from zero embeddings there, not from the encoded empty prompt).
    import numpy as np

    from ddiff_core.validation import ValidationRunner

    name, _, path = family_model
    family = get_family(name)
    paths = [path]
    if name == "sdxl":  # and an SDXL whose pipeline encodes the empty prompt instead
        paths.append(tmp_path / "encoded-empty")
        shutil.copytree(path, paths[1])
        index = json.loads((paths[1] / "model_index.json").read_text())
        (paths[1] / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    guidance = 3.5 if name == "flux" else 5.0
    for model in paths:
        components = family.load_components(str(model))
        run = ValidationRunner(family, components, components[family.denoiser_name], ["a cat on a hill"],
                               num_images=1, seed=3, resolution=64, num_inference_steps=3, guidance_scale=guidance,
                               max_sequence_length=32, output_dir=tmp_path, device="cpu", dtype=torch.float32)
        ours = np.asarray(run.generate()[0], dtype=np.float32) / 255
        stock = family.load_pipeline(str(model))("a cat on a hill", height=64, width=64, num_inference_steps=3,
                                                 guidance_scale=guidance, generator=torch.Generator().manual_seed(3),
                                                 output_type="np", **family.prompt_kwargs(32)).images[0]
        assert np.abs(ours - stock).max() < 2 / 255, model.name  # 8-bit rounding of ddiff's PNG, and float noise


def test_unset_flags_take_the_familys_upstream_defaults(family_model, tmp_path):
    # SD3 samples its timesteps logit-normally (its paper, upstream's SD3 script) and its pipeline reads 256 T5 tokens;
    # FLUX samples uniformly and reads 512. Flags given are kept.
    from ddiff_core.config import TrainConfig
    from ddiff_core.trainer import LoraTrainer

    from .conftest import DEMO_DATA

    name, _, path = family_model
    common = dict(pretrained_model_name_or_path=str(path), instance_data_dir=str(DEMO_DATA), resolution=64)
    trainer = LoraTrainer(TrainConfig(**common, output_dir=str(tmp_path / "a")))
    trainer.check_inputs()
    expected = ("logit_normal", 256) if name == "sd3" else ("none", 512)
    assert (trainer.config.weighting_scheme, trainer.config.max_sequence_length) == expected
    assert trainer.loss_settings.weighting_scheme == expected[0]
    if name == "sd3":  # the objective samples what the settings say: logit-normal gathers in the middle of the grid
        objective = get_family(name).training_objective(get_family(name).load_components(str(path)),
                                                        trainer.loss_settings)
        sampler = objective.sampler
        low, high = sorted(sampler.sigmas[[250, 750]].tolist())

        def middle(settings):
            _, sigmas = sampler.sample(4000, torch.Generator().manual_seed(0), settings)
            return ((sigmas > low) & (sigmas < high)).float().mean().item()

        uniform = dataclasses.replace(trainer.loss_settings, weighting_scheme="none")
        assert middle(trainer.loss_settings) > 0.65 and middle(uniform) < 0.55  # about 0.73 and 0.5
    if not get_family(name).noise_prediction:
        given = LoraTrainer(TrainConfig(**common, output_dir=str(tmp_path / "b"), weighting_scheme="mode",
                                        max_sequence_length=77))
        given.check_inputs()
        assert (given.config.weighting_scheme, given.config.max_sequence_length) == ("mode", 77)
