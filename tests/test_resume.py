"""Checkpoints and exact resume: killed (-9, also mid-checkpoint) or signalled runs resume to the same LoRA and log."""

import json
import os
import signal
import time

import pytest
import yaml
import torch
from safetensors.torch import load_file

from ddiff_core.checkpoint import MANIFEST, latest_checkpoint

from .conftest import DEMO_DATA, kill_tree, run_main, run_script, start_script, train_args

# Mid-epoch checkpoints (every 7 steps), accumulation, LR warm-up then decay, dropout (global RNG) on.
RUN = ["--max_train_steps", "36", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "7",
       "--lr_scheduler", "linear", "--lr_warmup_steps", "5", "--learning_rate", "1e-3", "--lora_dropout", "0.1",
       "--cache_latents", "--random_flip"]


def _log(out):
    return [(m["step"], m["loss"], m["lr"]) for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _assert_same_run(a, b):
    wa, wb = (load_file(o / "pytorch_lora_weights.safetensors") for o in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert _log(a) == _log(b)  # the same loss and learning rate at every step


# One process is the plain script (accelerate launch adds only a parent process; test_train runs it that way);
# two are accelerate launch with gloo DDP.
@pytest.fixture(scope="module", params=[0, 2], ids=["1proc", "2proc"])
def baseline(request, tiny_flux, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "out"
    run_script("train_lora.py", train_args(tiny_flux, out, *RUN), processes=request.param)
    return request.param, out


def _wait(proc, condition, what, poll_s=0.05):
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {what}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(poll_s)


@pytest.mark.parametrize("moment", ["after_checkpoint", "during_checkpoint"])
def test_kill_9_then_resume_matches_an_uninterrupted_run(baseline, tiny_flux, tmp_path, moment):
    processes, reference = baseline
    out = tmp_path / "out"
    proc = start_script("train_lora.py", train_args(tiny_flux, out, *RUN), processes=processes)
    if moment == "after_checkpoint":
        _wait(proc, lambda: (out / "checkpoint-14").exists(), "checkpoint-14")
    else:  # a checkpoint folder still being written
        _wait(proc, lambda: any(int(p.name.split("-")[1].split(".")[0]) >= 14 for p in out.glob(".checkpoint-*.tmp")),
              "a checkpoint being written", poll_s=0.0002)  # a write lasts milliseconds
    kill_tree(proc.pid, signal.SIGKILL)  # the launcher and every worker, at once
    proc.wait()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    resumed = run_script("train_lora.py", train_args(tiny_flux, out, *RUN, "--resume_from_checkpoint", "latest"),
                         processes=processes)
    assert "resumed from" in resumed.stderr
    assert not list(out.glob(".checkpoint-*.tmp"))
    _assert_same_run(out, reference)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_exits_nonzero_and_resumes(baseline, tiny_flux, tmp_path, signum):
    processes, reference = baseline
    if processes == 2 and signum == signal.SIGINT:
        pytest.skip("Ctrl-C is a one-terminal case; SIGTERM covers preemption under DDP")
    out = tmp_path / "out"
    proc = start_script("train_lora.py", train_args(tiny_flux, out, *RUN), processes=processes)
    metrics = out / "metrics.jsonl"
    _wait(proc, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 10, "step 10")
    os.killpg(proc.pid, signum)  # the launcher's group, as a terminal or a scheduler would; torchrun forwards it
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "--resume_from_checkpoint latest" in stderr
    stopped_at = _log(out)[-1][0]
    assert (out / f"checkpoint-{stopped_at}" / MANIFEST).exists()  # the step it finished was saved
    run_script("train_lora.py", train_args(tiny_flux, out, *RUN, "--resume_from_checkpoint", "latest"), processes=processes)
    _assert_same_run(out, reference)


def test_checkpoints_are_pruned_after_commit_and_latest_skips_broken_ones(tiny_flux, tmp_path, caplog, capsys):
    out = tmp_path / "out"
    run_script("train_lora.py", train_args(tiny_flux, out, "--max_train_steps", "9", "--checkpointing_steps", "3",
                                           "--checkpoints_total_limit", "2"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-9"]
    assert not list(out.glob(".checkpoint-*"))
    (out / ".checkpoint-12.tmp").mkdir()  # what a kill during a write leaves behind
    (out / ".checkpoint-12.tmp" / "optimizer.safetensors").write_bytes(b"partial")
    (out / "checkpoint-15").mkdir()  # a folder without a manifest
    assert latest_checkpoint(out).name == "checkpoint-9"
    lora = out / "checkpoint-9" / "lora.safetensors"
    lora.write_bytes(lora.read_bytes()[:-8] + b"corrupt!")
    assert latest_checkpoint(out).name == "checkpoint-6"
    assert "checkpoint-9: lora.safetensors is corrupt" in caplog.text

    code, stderr = run_main("train_lora.py", train_args(tiny_flux, out, "--max_train_steps", "12",
                                                        "--resume_from_checkpoint", str(out / "checkpoint-9")), capsys)
    assert code == 2 and "lora.safetensors is corrupt" in stderr.splitlines()[-1]
    (out / "checkpoint-6" / "optimizer.safetensors").unlink()
    code, stderr = run_main("train_lora.py", train_args(tiny_flux, out, "--resume_from_checkpoint", str(out / "checkpoint-6")),
                            capsys)
    assert code == 2 and "is missing optimizer.safetensors" in stderr.splitlines()[-1]


def test_validation_does_not_change_the_trained_lora(tiny_flux, tmp_path):
    common = ["--max_train_steps", "8", "--lora_dropout", "0.1", "--learning_rate", "1e-3"]
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "plain", *common))
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "validated", *common, "--validation_prompt",
                                           "<demo-style> a cat|<demo-style> a rocket", "--num_validation_images", "2",
                                           "--validation_steps", "3", "--validation_inference_steps", "2"))
    _assert_same_run(tmp_path / "plain", tmp_path / "validated")
    grids = sorted(p.name for p in (tmp_path / "validated" / "validation").iterdir())
    assert grids == ["final-base-vs-lora.png", "step-000003.png", "step-000006.png"]


def test_non_finite_loss_stops_with_the_step_and_files(tiny_flux, tmp_path):
    out = tmp_path / "out"
    result = run_script("train_lora.py", train_args(tiny_flux, out, "--max_train_steps", "20", "--learning_rate", "1e30",
                                                    "--checkpointing_steps", "1"), check=False)
    assert result.returncode == 3
    last = result.stderr.strip().splitlines()[-1]
    assert "non-finite loss" in last and "at step" in last and ".jpg" in last
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    for checkpoint in out.glob("checkpoint-*"):
        for value in load_file(checkpoint / "lora.safetensors").values():
            assert torch.isfinite(value).all(), checkpoint


def test_a_resume_keeps_the_recorded_values_of_flags_left_unset(tiny_flux, tmp_path):
    # Flags whose default is the family's (--weighting_scheme, --max_sequence_length) and the default bucket list
    # may change between versions; a run resumed after such a change must keep what it started with, not be refused
    # as another run. Here the first launch sets them; the resume leaves them unset.
    def args(out, steps, *extra):
        return ["--pretrained_model_name_or_path", str(tiny_flux), "--instance_data_dir", str(DEMO_DATA),
                "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--seed", "0",
                "--report_to", "none", "--checkpointing_steps", "2", "--max_train_steps", str(steps), *extra]

    out = tmp_path / "out"
    run_script("train_lora.py", args(out, 2, "--weighting_scheme", "logit_normal", "--max_sequence_length", "24",
                                     "--aspect_ratio_buckets", "48,112;64,64"))
    run_script("train_lora.py", args(out, 4, "--use_aspect_ratio_buckets", "--resume_from_checkpoint", "latest"))
    config = yaml.safe_load((out / "training_config.yaml").read_text())
    assert (config["weighting_scheme"], config["max_sequence_length"]) == ("logit_normal", 24)
    assert {b["bucket"] for b in json.loads((out / "buckets.json").read_text())["buckets"]} <= {"48x112", "64x64"}
    assert [step for step, _, _ in _log(out)] == [1, 2, 3, 4]
    run_script("train_lora.py", args(tmp_path / "fresh", 1))  # a fresh run takes the family's defaults
    config = yaml.safe_load((tmp_path / "fresh" / "training_config.yaml").read_text())
    assert (config["weighting_scheme"], config["max_sequence_length"]) == ("none", 512)
