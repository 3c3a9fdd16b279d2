"""Speed settings that must not change what is trained: regional compilation (same losses as eager, exact resume,
a bounded number of graphs, validation uncompiled), checkpointing every N-th block, and the attention backend
choice with its refusals."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddiff_core.builders import add_trainable_lora, remove_trainable_lora
from ddiff_core.families import get_family
from ddiff_core.speed import check_attention_backend, repeated_blocks

from .conftest import assert_resume_from_copy_is_exact, run_main, run_script, train_args


def _losses(out):
    return torch.tensor([json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()])


def test_compiled_training_matches_eager_resumes_exactly_and_compiles_a_bounded_set_of_graphs(tiny_flux, tmp_path):
    args = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--learning_rate", "1e-2",
            "--validation_prompt", "a cat", "--validation_steps", "2", "--num_validation_images", "1",
            "--validation_inference_steps", "2"]
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "eager", *args, "--no-compile"))
    assert_resume_from_copy_is_exact(tiny_flux, tmp_path, [*args, "--compile"])
    torch.testing.assert_close(_losses(tmp_path / "full"), _losses(tmp_path / "eager"), rtol=1e-4, atol=0)
    summary = json.loads((tmp_path / "full" / "run_summary.json").read_text())
    # Two block classes (double and single stream), forward and backward: a handful of graphs for 6 steps with three
    # validations, not one per step (validation runs uncompiled).
    assert 0 < summary["compiled_graphs"] <= 8
    assert json.loads((tmp_path / "eager" / "run_summary.json").read_text())["compiled_graphs"] is None
    assert summary["attention_backend"] == "native"


class _CountCasts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


def _bf16_step(denoiser, family):
    """Loss and LoRA gradients of one bf16 forward and backward under autocast, as the trainer runs it, and the number
    of dtype casts it made."""

    gen = torch.Generator().manual_seed(0)
    cfg = denoiser.config
    noisy = torch.randn(2, cfg.in_channels // 4, 8, 8, generator=gen).bfloat16()
    embeds = {"prompt_embeds": torch.randn(2, 6, cfg.joint_attention_dim, generator=gen),
              "pooled_prompt_embeds": torch.randn(2, cfg.pooled_projection_dim, generator=gen)}
    denoiser.zero_grad(set_to_none=True)
    with _CountCasts() as counter, torch.autocast("cpu", torch.bfloat16):
        pred = family.predict_velocity(denoiser, noisy, torch.tensor([300.0, 700.0]), embeds, family.loss_settings())
        loss = pred.float().square().mean()
    with _CountCasts() as backward:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in denoiser.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counter.casts + backward.casts


@pytest.mark.parametrize("checkpointing", [False, True])
def test_skipping_peft_input_casts_under_autocast_changes_no_bit_and_casts_less(tiny_flux, checkpointing):
    from peft.tuners.lora import LoraLayer

    family = get_family("flux")
    denoiser = family.load_components(str(tiny_flux), dtype=torch.bfloat16)[family.denoiser_name]
    add_trainable_lora(denoiser, family, rank=4, alpha=4, dropout=0.0, lora_layers=None, seed=0,
                       gradient_checkpointing=checkpointing)
    layers = [m for m in denoiser.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    for p in denoiser.parameters():  # a non-zero B, so the LoRA's path carries gradient to the inputs
        if p.requires_grad:
            p.data.normal_(generator=torch.Generator().manual_seed(1))
    skipped = _bf16_step(denoiser, family)
    for m in layers:
        m.cast_input_dtype_enabled = True  # peft's default
    cast = _bf16_step(denoiser, family)
    assert torch.equal(skipped[0], cast[0])
    assert all(torch.equal(skipped[1][n], cast[1][n]) for n in cast[1])
    assert skipped[2] < cast[2] - 2 * len(layers)  # at least the input's up-cast and its gradient's, per layer


def test_input_casts_stay_where_they_are_not_a_round_trip(tiny_flux, tmp_path):
    from peft.tuners.lora import LoraLayer

    family = get_family("flux")
    # fp32 weights (no autocast); dropout (it would run in another dtype); a caller that runs without autocast
    for dtype, dropout, autocast in [(torch.float32, 0.0, None), (torch.bfloat16, 0.1, None),
                                     (torch.float16, 0.0, False)]:
        denoiser = family.load_components(str(tiny_flux), dtype=dtype)[family.denoiser_name]
        add_trainable_lora(denoiser, family, rank=4, alpha=4, dropout=dropout, lora_layers=None, seed=0,
                           autocast=autocast)
        assert all(m.cast_input_dtype_enabled for m in denoiser.modules() if isinstance(m, LoraLayer))
    # accelerate runs fp16 on the CPU without autocast: the trainer keeps peft's casts, which make the dtypes meet
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "fp16", "--max_train_steps", "1",
                                           "--mixed_precision", "fp16"))
    assert _losses(tmp_path / "fp16").isfinite().all()


@pytest.mark.parametrize("checkpointing", [
    pytest.param(["--gradient_checkpointing"], marks=pytest.mark.slow, id="every-block"),
    pytest.param(["--gradient_checkpointing", "--gradient_checkpointing_interval", "2"], id="every-2nd-block"),
])
def test_compiled_ddp_with_checkpointing_trains_as_eager(tiny_flux, tmp_path, checkpointing):
    """Two processes, each block compiled inside DDP and inside (or around) its checkpoint: the eager run's losses,
    one LoRA on both processes, and a bounded number of graphs."""
    args = ["--max_train_steps", "3", "--learning_rate", "1e-2", "--cache_latents", *checkpointing]
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "eager", *args), processes=2)
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "compiled", *args, "--compile"), processes=2)
    torch.testing.assert_close(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=1e-4, atol=0)
    summary = json.loads((tmp_path / "compiled" / "run_summary.json").read_text())
    assert summary["num_processes"] == 2 and len(set(summary["lora_sha256_per_process"])) == 1
    assert 0 < summary["compiled_graphs"] <= 8


def test_checkpointing_every_other_block_changes_no_maths(tiny_flux, tmp_path):
    args = ["--max_train_steps", "3", "--learning_rate", "1e-2"]
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "plain", *args))
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "ckpt", *args, "--gradient_checkpointing",
                                           "--gradient_checkpointing_interval", "2"))
    torch.testing.assert_close(_losses(tmp_path / "ckpt"), _losses(tmp_path / "plain"), rtol=1e-5, atol=0)


def test_checkpoint_interval_wraps_every_nth_repeated_block_and_is_undone(tiny_flux):
    family = get_family("flux")
    denoiser = family.load_components(str(tiny_flux))[family.denoiser_name]
    blocks = repeated_blocks(denoiser, family)
    assert len(blocks) == 4  # 2 double-stream + 2 single-stream in the tiny FLUX
    add_trainable_lora(denoiser, family, rank=4, alpha=4, dropout=0.0, lora_layers=None, seed=0,
                       gradient_checkpointing=True, checkpointing_interval=2)
    assert [getattr(b, "_ddiff_checkpointed", False) for b in blocks] == [True, False, True, False]
    remove_trainable_lora(denoiser, family)
    assert not any("forward" in b.__dict__ for b in blocks) and not getattr(denoiser, "peft_config", None)


@pytest.mark.parametrize("backend, message", [
    ("_native_cudnn", "illegal memory access"), ("flash_hub", "Hub at run time"), ("bogus", "not one of"),
    ("flash", "needs a CUDA device"), ("ddiff_cudnn", "needs a CUDA device with cuDNN"),
])
def test_attention_backends_known_to_fail_are_refused_before_loading(tiny_flux, tmp_path, capsys, backend, message):
    if backend in ("flash", "ddiff_cudnn") and torch.cuda.is_available():
        pytest.skip(f"{backend} is allowed on CUDA")
    with pytest.raises(ValueError, match=message):
        check_attention_backend(backend, "cpu")
    code, err = run_main("train_lora.py", train_args(tiny_flux, tmp_path / "out", "--attention_backend", backend,
                                                     "--mixed_precision", "bf16"), capsys)
    assert code == 2 and message in err and "Loading pipeline" not in err


def test_ddiff_cudnn_is_refused_without_bf16_or_fp16_before_loading(tiny_flux, tmp_path, capsys):
    # cuDNN's attention takes half precision only: on any device, a full-precision run is told so before the model loads.
    code, err = run_main("train_lora.py", train_args(tiny_flux, tmp_path / "out", "--attention_backend", "ddiff_cudnn",
                                                     "--mixed_precision", "no"), capsys)
    assert code == 2 and "takes bf16 or fp16 only" in err and "Loading pipeline" not in err


@pytest.mark.parametrize("compiled", [False, True])
def test_the_layout_matched_attention_computes_what_diffusers_does_and_gives_its_slot_back(tiny_flux, compiled):
    # ddiff_cudnn takes the _native_cudnn slot of diffusers' dispatcher for a run; on the CPU the same function runs
    # on the math kernel: FLUX's loss and every LoRA gradient must be those of diffusers' own math backend, eager and
    # compiled (without a graph break), and a reset must put diffusers' entry back.
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry as registry
    from torch._dynamo.utils import counters
    from torch.nn.attention import SDPBackend

    from ddiff_core.speed import install_attention, layout_matched_attention, reset_attention_backend

    family = get_family("flux")
    denoiser = family.load_components(str(tiny_flux), dtype=torch.float32)[family.denoiser_name]
    add_trainable_lora(denoiser, family, rank=4, alpha=4, dropout=0.0, lora_layers=None, seed=0,
                       gradient_checkpointing=False, compile=compiled)
    for p in denoiser.parameters():  # a non-zero B, so the gradients pass through the LoRA and the attention
        if p.requires_grad:
            p.data.normal_(generator=torch.Generator().manual_seed(1))
    original = registry._backends[AttentionBackendName._NATIVE_CUDNN]
    breaks_before = sum(counters["graph_break"].values())
    results = {}
    try:
        for name in ("_native_math", "_native_cudnn"):
            if name == "_native_cudnn":
                install_attention(name, layout_matched_attention(SDPBackend.MATH))
            denoiser.set_attention_backend(name)
            results[name] = _fp32_step(denoiser, family)
    finally:
        reset_attention_backend(denoiser)
    assert registry._backends[AttentionBackendName._NATIVE_CUDNN] is original
    assert sum(counters["graph_break"].values()) == breaks_before
    (loss_a, grads_a), (loss_b, grads_b) = results.values()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for n, g in grads_a.items() if "attn.to_q" in n)


def test_the_layout_matched_attention_hands_sdpa_the_gradient_in_its_outputs_layout(monkeypatch):
    # What ddiff_cudnn changes: SDPA's backward gets its output's gradient in the output's strides, for the gradient of
    # a double-stream block (contiguous (B, S, H*D)) and of a single-stream block (a slice of a 5x wider tensor); the
    # same computation without the re-layout (diffusers' _native_cudnn, here on the math kernel) hands it on unchanged.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ddiff_core.speed import layout_matched_attention

    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        out.register_hook(lambda grad: seen.append(grad.stride() == out.stride()))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)

    def plain(q, k, v):
        q, k, v = (x.permute(0, 2, 1, 3).contiguous() for x in (q, k, v))
        with sdpa_kernel(SDPBackend.MATH):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3)

    grad = torch.randn(1, 8, 2 * 4)
    wide = torch.zeros(1, 8, 5 * 2 * 4)
    wide[..., :8] = grad
    for attention, matched in ((plain, False), (layout_matched_attention(SDPBackend.MATH), True)):
        for g in (grad, wide[..., :8]):
            q, k, v = (torch.randn(1, 8, 2, 4, requires_grad=True) for _ in range(3))
            attention(q, k, v).flatten(2, 3).backward(g)
    assert seen == [False, False, True, True]


def test_ddiff_cudnn_borrows_diffusers_cudnn_slot_for_a_run_and_gives_it_back(tiny_flux):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry as registry

    from ddiff_core import speed

    family = get_family("flux")
    denoiser = family.load_components(str(tiny_flux), dtype=torch.float32)[family.denoiser_name]
    slot = AttentionBackendName._NATIVE_CUDNN
    original = registry._backends[slot]
    try:
        speed.set_attention_backend(denoiser, "ddiff_cudnn")
        assert registry._backends[slot] is not original and "return_lse" in registry._supported_arg_names[slot]
        backends = {m.processor._attention_backend for m in denoiser.modules() if hasattr(m, "processor")}
        assert backends == {slot}
        speed.set_attention_backend(denoiser, "ddiff_cudnn")  # a second run of the launch: the original is kept
    finally:
        speed.reset_attention_backend(denoiser)
    assert registry._backends[slot] is original and not speed._REPLACED
    assert {m.processor._attention_backend for m in denoiser.modules() if hasattr(m, "processor")} == {None}


def _fp32_step(denoiser, family):
    gen = torch.Generator().manual_seed(0)
    cfg = denoiser.config
    noisy = torch.randn(2, cfg.in_channels // 4, 8, 8, generator=gen)
    embeds = {"prompt_embeds": torch.randn(2, 6, cfg.joint_attention_dim, generator=gen),
              "pooled_prompt_embeds": torch.randn(2, cfg.pooled_projection_dim, generator=gen)}
    denoiser.zero_grad(set_to_none=True)
    pred = family.predict_velocity(denoiser, noisy, torch.tensor([300.0, 700.0]), embeds, family.loss_settings())
    loss = pred.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in denoiser.named_parameters() if p.requires_grad}


def test_an_explicit_cpu_attention_backend_trains(tiny_flux, tmp_path):
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "math", "--max_train_steps", "2",
                                           "--attention_backend", "_native_math"))
    assert (tmp_path / "math" / "pytorch_lora_weights.safetensors").is_file()
    # The summary says which attention trained the LoRA (a benchmark's run is read back by it).
    assert json.loads((tmp_path / "math" / "run_summary.json").read_text())["attention_backend"] == "_native_math"


def test_a_checkpoint_of_an_unfused_adamw_resumes_into_a_fused_one():
    """How the optimizer runs (fused on CUDA, not on the CPU) is not part of what it learnt."""
    from ddiff_core.checkpoint import _optimizer_state_problem, load_optimizer_state

    param = torch.nn.Parameter(torch.ones(4))
    plain = torch.optim.AdamW([param])
    param.grad = torch.ones(4)
    plain.step()
    fused = torch.optim.AdamW([torch.nn.Parameter(torch.ones(4))], fused=True)
    assert _optimizer_state_problem(plain.state_dict(), fused) is None
    load_optimizer_state(fused, plain.state_dict())
    assert fused.param_groups[0]["fused"] is True
    assert torch.equal(fused.state_dict()["state"][0]["exp_avg"], plain.state_dict()["state"][0]["exp_avg"])


def test_attention_backends_are_refused_for_families_outside_the_dispatcher(tmp_path, capsys):
    from ddiff_core.tiny import save_tiny_pipeline

    sd3 = save_tiny_pipeline("sd3", tmp_path / "sd3")
    code, err = run_main("train_lora.py", train_args(sd3, tmp_path / "out", "--attention_backend", "_native_math"),
                         capsys)
    assert code == 2 and "attention dispatcher" in err


def test_compile_left_unset_is_on_only_where_the_gpu_measured_it_pays(tiny_flux, tmp_path, monkeypatch):
    # Measured on an H200: FLUX, unquantized base, one GPU (1.27x at 1024 px, 1.41-1.46x with checkpointing). On the CPU
    # it gained nothing; other families, a quantized base and FSDP were not measured. A flag given is kept.
    from ddiff_core.config import TrainConfig
    from ddiff_core.speed import default_compile
    from ddiff_core.trainer import LoraTrainer, env_flag

    from .conftest import DEMO_DATA

    # accelerate's launcher writes its flags as values: ACCELERATE_USE_CPU=False on a GPU launch means the GPU.
    for value, expected in (("False", False), ("false", False), ("0", False), ("", False), ("True", True),
                            ("true", True), ("1", True)):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", value)
        assert env_flag("ACCELERATE_USE_FSDP") is expected
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert not env_flag("ACCELERATE_USE_FSDP")
    assert default_compile("flux", "cuda", "none", sharded=False)
    assert not any([default_compile("flux", "cpu", "none", sharded=False),
                    default_compile("sd3", "cuda", "none", sharded=False),
                    default_compile("sdxl", "cuda", "none", sharded=False),
                    default_compile("flux", "cuda", "int8", sharded=False),
                    default_compile("flux", "cuda", "nf4", sharded=False),
                    default_compile("flux", "cuda", "none", sharded=True)])
    common = dict(pretrained_model_name_or_path=str(tiny_flux), instance_data_dir=str(DEMO_DATA), resolution=64)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # a CPU run, on any machine
    for given, expected in ((None, False), (True, True), (False, False)):
        trainer = LoraTrainer(TrainConfig(**common, output_dir=str(tmp_path / str(given)), compile=given))
        trainer.check_inputs()
        assert trainer.config.compile is expected
