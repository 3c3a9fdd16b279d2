"""Speed settings that must not change what is trained: regional compilation (same losses as eager, exact resume,
a bounded number of graphs, validation uncompiled), checkpointing every N-th block, and the attention backend
choice with its refusals."""

import json

import pytest
import torch

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
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "eager", *args))
    assert_resume_from_copy_is_exact(tiny_flux, tmp_path, [*args, "--compile"])
    torch.testing.assert_close(_losses(tmp_path / "full"), _losses(tmp_path / "eager"), rtol=1e-4, atol=0)
    summary = json.loads((tmp_path / "full" / "run_summary.json").read_text())
    # Two block classes (double and single stream), forward and backward: a handful of graphs for 6 steps with three
    # validations, not one per step (validation runs uncompiled).
    assert 0 < summary["compiled_graphs"] <= 8
    assert json.loads((tmp_path / "eager" / "run_summary.json").read_text())["compiled_graphs"] is None


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
    ("flash", "needs a CUDA device"),
])
def test_attention_backends_known_to_fail_are_refused_before_loading(tiny_flux, tmp_path, capsys, backend, message):
    if backend == "flash" and torch.cuda.is_available():
        pytest.skip("flash is allowed on CUDA")
    with pytest.raises(ValueError, match=message):
        check_attention_backend(backend, "cpu")
    code, err = run_main("train_lora.py", train_args(tiny_flux, tmp_path / "out", "--attention_backend", backend), capsys)
    assert code == 2 and message in err and "Loading pipeline" not in err


def test_an_explicit_cpu_attention_backend_trains(tiny_flux, tmp_path):
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "math", "--max_train_steps", "2",
                                           "--attention_backend", "_native_math"))
    assert (tmp_path / "math" / "pytorch_lora_weights.safetensors").is_file()


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
