"""A quantized frozen base (torchao int8 runs on the CPU; fp8 and NF4 are refused here with the reason), 8-bit
Adam, and the memory estimate and out-of-memory advice."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from ddiff_core.builders import add_trainable_lora, load_base, remove_trainable_lora
from ddiff_core.config import ConfigError, parse_config
from ddiff_core.families import get_family
from ddiff_core.memory import estimate_peak, out_of_memory_advice
from ddiff_core.speed import repeated_blocks

from .conftest import assert_resume_from_copy_is_exact, initial_lora, run_main, run_script, train_args

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")


def _bnb_works() -> str | None:
    """Why bitsandbytes' 8-bit Adam cannot step here, or None."""
    try:
        import bitsandbytes

        p = torch.nn.Parameter(torch.ones(8))
        p.grad = torch.ones(8)
        bitsandbytes.optim.AdamW8bit([p]).step()
    except Exception as err:  # not installed, or no backend for this device
        return f"bitsandbytes' AdamW8bit does not step on this machine ({type(err).__name__}: {str(err)[:80]})"
    return None


@needs_torchao
def test_an_int8_base_trains_resumes_exactly_and_its_lora_loads_into_the_full_precision_pipeline(tiny_flux, tmp_path):
    from diffusers import FluxPipeline

    args = ["--base_quantization", "int8", "--max_train_steps", "6", "--checkpointing_steps", "3",
            "--learning_rate", "5e-2"]
    assert_resume_from_copy_is_exact(tiny_flux, tmp_path, args)
    lora = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    start = initial_lora(tiny_flux)
    assert lora.keys() == start.keys() and all(lora[k].dtype == torch.float32 for k in lora)
    assert any(not torch.equal(lora[k], start[k]) for k in lora)  # it trained
    assert json.loads((tmp_path / "full" / "run.json").read_text())["settings"]["base_quantization"] == "int8"

    pipe = FluxPipeline.from_pretrained(str(tiny_flux))  # the stock pipeline, fp32, unquantized
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = image()
    pipe.load_lora_weights(str(tmp_path / "full"))
    assert not torch.allclose(base, image(), atol=1e-4)


@needs_torchao
def test_quantized_layers_compute_in_the_autocast_dtype_as_unquantized_ones_do(tiny_flux):
    """torchao's int8 weights take F.linear over before autocast sees it: an fp32 activation (on CUDA, every
    layer_norm's output under autocast) would keep the residual stream in fp32 from there on, 2 GiB more at 1024 px
    on the H200. Fed fp32 inputs under bf16 autocast, the int8 base must compute in bf16 block by block, as the
    unquantized base does."""
    from ddiff_core.quantization import follow_autocast

    family = get_family("flux")
    seen = {}
    for kind in ("none", "int8"):
        model = load_base(family, str(tiny_flux), dtype=torch.bfloat16, device="cpu", quantization=kind)["transformer"]
        dtypes = set()

        def record(module, args, out):
            dtypes.update(t.dtype for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t))

        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            block.register_forward_hook(record)
        c, tokens, text = model.config, 16, 8
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            out = model(hidden_states=torch.randn(1, tokens, c.in_channels, generator=generator),
                        encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim, generator=generator),
                        pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=generator),
                        timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]) if c.guidance_embeds else None,
                        img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), return_dict=False)[0]
        seen[kind] = (dtypes, out.dtype)
        if kind == "int8":
            assert follow_autocast(model) == 0  # every quantized layer was hooked at load, and only once
    assert seen["int8"] == seen["none"] == ({torch.bfloat16}, torch.bfloat16)


@needs_torchao
def test_an_int8_base_compiles_and_trains_as_eager(tiny_flux, tmp_path):
    """torchao's int8 weights are tensor subclasses: AOT autograd then refuses aliased block outputs (FLUX's
    single-stream block returns two views of one tensor), so ddiff's compiled blocks return copies. Validation runs
    on the quantized denoiser in between."""
    args = ["--base_quantization", "int8", "--max_train_steps", "2", "--learning_rate", "5e-2", "--cache_latents"]
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "eager", *args, "--no-compile"))
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "compiled", *args, "--compile", "--validation_prompt",
                                           "a cat", "--validation_steps", "1", "--num_validation_images", "1",
                                           "--validation_inference_steps", "2"))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("eager", "compiled")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=0)
    # Validation ran on the quantized denoiser, its blocks uncompiled, between the compiled steps.
    assert (tmp_path / "compiled" / "validation" / "step-000002.png").is_file()

    family = get_family("flux")  # the copying wrapper is undone with the compilation
    denoiser = load_base(family, str(tiny_flux), dtype=torch.float32, device="cpu", quantization="int8")["transformer"]
    add_trainable_lora(denoiser, family, rank=4, alpha=4, dropout=0.0, lora_layers=None, seed=0,
                       gradient_checkpointing=True, checkpointing_interval=2, compile=True)
    blocks = repeated_blocks(denoiser, family)
    assert all("forward" in b.__dict__ for b in blocks)
    remove_trainable_lora(denoiser, family)
    assert not any("forward" in b.__dict__ or "_ddiff_forward_before_copy" in b.__dict__ for b in blocks)


@pytest.mark.parametrize("flags, message", [
    (["--base_quantization", "fp8"], "compute capability 8.9"),
    (["--do_fp8_training"], "compute capability 8.9"),
    (["--base_quantization", "nf4"], "only on a CUDA GPU"),
])
def test_quantizations_this_machine_cannot_do_are_refused_before_loading(tiny_flux, tmp_path, capsys, flags, message):
    if torch.cuda.is_available():
        pytest.skip("refused only without a suitable GPU")
    code, err = run_main("train_lora.py", train_args(tiny_flux, tmp_path / "out", *flags), capsys)
    assert code == 2 and message in err and "Loading pipeline" not in err


def test_upstream_quantization_flags_are_two_ways_to_say_one_thing(tiny_flux, tmp_path):
    assert parse_config(train_args(tiny_flux, tmp_path, "--do_fp8_training")).base_quantization == "fp8"
    bnb = tmp_path / "bnb.json"
    bnb.write_text(json.dumps({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}))
    config = parse_config(train_args(tiny_flux, tmp_path, "--bnb_quantization_config_path", str(bnb)))
    assert config.base_quantization == "nf4"
    with pytest.raises(ConfigError, match="means --base_quantization fp8"):
        parse_config(train_args(tiny_flux, tmp_path, "--do_fp8_training", "--base_quantization", "int8"))


def test_8bit_adam_resumes_exactly(tiny_flux, tmp_path):
    reason = _bnb_works()
    if reason:
        pytest.skip(reason)
    # rank 128: the tiny model's larger LoRA matrices reach bitsandbytes' 4096-element minimum for 8-bit states
    assert_resume_from_copy_is_exact(tiny_flux, tmp_path, ["--use_8bit_adam", "--max_train_steps", "6",
                                                            "--checkpointing_steps", "3", "--rank", "128",
                                                            "--lora_alpha", "128"])
    state = load_file(tmp_path / "full" / "checkpoint-3" / "optimizer.safetensors")
    assert any(t.dtype == torch.uint8 for t in state.values())  # 8-bit moments were stored and resumed


def test_the_peak_estimate_follows_the_settings_and_is_printed(tiny_flux, tmp_path):
    family = get_family("flux")
    components = family.load_components(str(tiny_flux))
    denoiser = components["transformer"]
    add_trainable_lora(denoiser, family, rank=4, alpha=4, dropout=0.0, lora_layers=None, seed=0)
    blocks = repeated_blocks(denoiser, family)

    def estimate(**kw):
        settings = dict(tokens=64 + 32, batch=1, checkpointing_interval=0, weight_dtype=torch.bfloat16)
        return estimate_peak(components, denoiser, blocks, **{**settings, **kw})

    plain = estimate()
    assert estimate(checkpointing_interval=1).activations < estimate(checkpointing_interval=2).activations \
        < plain.activations
    assert estimate(batch=2).activations == 2 * plain.activations
    assert estimate(eight_bit_adam=True).lora_and_optimizer < plain.lora_and_optimizer
    assert plain.weights == sum(t.numel() * t.element_size() for m in components.values()
                                if isinstance(m, torch.nn.Module) for t in [*m.parameters(), *m.buffers()])
    result = run_script("train_lora.py", train_args(tiny_flux, tmp_path / "out", "--max_train_steps", "1"))
    assert "estimated peak memory of a step" in result.stderr


def test_out_of_memory_advice_names_the_peak_and_flags_not_in_use(tiny_flux, tmp_path):
    config = parse_config(train_args(tiny_flux, tmp_path, "--gradient_checkpointing", "--use_8bit_adam"))
    line = out_of_memory_advice(30 * 2**30, 24 * 2**30, config)
    assert "30.0 GiB of the card's 24.0 GiB" in line and "--base_quantization int8" in line
    assert "--gradient_checkpointing" not in line and "--use_8bit_adam" not in line and "\n" not in line


def test_the_benchmarks_nf4_base_takes_peft_s_4bit_lora_and_trains(tiny_flux):
    # The full-size memory benchmark quantizes a random model in memory (quantize_in_memory), not through diffusers'
    # load; it must mark the model as diffusers does, or peft wraps the 4-bit layers in its plain LoRA layer and the
    # benchmark measures a step the trainer never takes.
    try:
        import bitsandbytes.functional
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        bitsandbytes.functional.quantize_4bit(torch.ones(64, 64, dtype=torch.bfloat16), quant_type="nf4")
    except Exception as err:  # not installed, or no 4-bit backend for this CPU
        pytest.skip(f"bitsandbytes' 4-bit layers do not run here ({type(err).__name__}: {str(err)[:80]})")
    from ddiff_core.quantization import quantize_in_memory

    family = get_family("flux")
    model = family.load_components(str(tiny_flux), dtype=torch.bfloat16)["transformer"]
    quantize_in_memory(model, "nf4")
    add_trainable_lora(model, family, rank=4, alpha=4, dropout=0.0, lora_layers=None, seed=0)
    wrapped = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert wrapped and all(isinstance(m, LoraLinear4bit) for m in wrapped)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    noisy = torch.randn(1, cfg.in_channels // 4, 8, 8, generator=gen).bfloat16()
    embeds = {"prompt_embeds": torch.randn(1, 6, cfg.joint_attention_dim, generator=gen),
              "pooled_prompt_embeds": torch.randn(1, cfg.pooled_projection_dim, generator=gen)}
    with torch.autocast("cpu", torch.bfloat16):
        pred = family.predict_velocity(model, noisy, torch.tensor([500.0]), embeds, family.loss_settings())
    pred.float().square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
