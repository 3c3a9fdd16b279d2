"""End to end: the real training script under accelerate, on the tiny FLUX and the shipped demo data."""

import json
import math

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open

from .conftest import DEMO_IMAGES, REPO, assert_same_training, initial_lora, run_main, run_script, train_args


def _generate(pipe):
    return pipe("<demo-style> a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_demo_command_trains_a_lora_that_loads_and_changes_the_output(tiny_flux, tmp_path):
    out = tmp_path / "demo-lora"
    result = run_script("train_lora.py", ["--config", str(REPO / "configs/demo.yaml"), "--pretrained_model_name_or_path",
                                          str(tiny_flux), "--output_dir", str(out), "--max_train_steps", "12"], processes=1)
    assert "pytorch_lora_weights.safetensors" in result.stdout  # the summary says where the outputs are
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert all(m["loss"] > 0 and m["step_time_s"] > 0 and m["samples_per_s"] > 0 for m in metrics)
    assert list((out / "logs").rglob("events.out.tfevents*")), "TensorBoard logs"
    card = (out / "README.md").read_text()
    assert 'instance_prompt: "<demo-style>"' in card and "load_lora_weights" in card
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert meta["transformer.r"] == 8 and meta["transformer.lora_alpha"] == 8
    assert any("single_transformer_blocks" in k and "proj_mlp" in k for k in keys)  # the preset upstream misses
    assert not any(k.startswith("transformer.proj_out") for k in keys)  # ... but not the final output layer

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    base = _generate(pipe)
    pipe.load_lora_weights(out)
    assert (base - _generate(pipe)).abs().max() > 1e-4


def test_cached_and_uncached_runs_train_the_same_lora(tiny_flux, tmp_path):
    common = ["--num_train_epochs", "2", "--learning_rate", "1e-3", "--random_flip"]  # two reshuffled epochs
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "cached", *common, "--cache_latents"))
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "fresh", *common, "--no-cache_text_embeddings"))
    assert list((tmp_path / "cached" / "cache").glob("latents-*.safetensors"))
    assert not (tmp_path / "fresh" / "cache").exists()
    assert_same_training(tmp_path / "cached", tmp_path / "fresh", initial_lora(tiny_flux))
    steps = [json.loads(line)["step"] for line in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2 * math.ceil(DEMO_IMAGES / 2)


def test_ddp_two_processes_end_with_identical_weights(tiny_flux, tmp_path):
    out = tmp_path / "ddp"
    run_script("train_lora.py", train_args(tiny_flux, out, "--max_train_steps", "4", "--cache_latents"), processes=2)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert len(set(summary["lora_sha256_per_process"])) == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # only rank 0 writes


def _bad_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    return ["--pretrained_model_name_or_path", str(tmp_path / "m")]


@pytest.mark.parametrize("case, message", [
    ("missing_dir", "does not exist"),
    ("empty_dir", "holds no images"),
    ("no_captions", "has no caption"),
    ("unknown_flag", "unrecognized arguments: --learning_rte"),
    ("unknown_key", "unknown key 'rnak'"),
    ("resolution", "--resolution 72 is not a positive multiple of 16"),
    ("not_a_pipeline", "no model_index.json"),
    ("unknown_family", "no registered model family handles"),
])
def test_bad_input_is_a_one_line_error_before_loading(tiny_flux, tmp_path, capsys, case, message):
    args = train_args(tiny_flux, tmp_path / "out")
    data = tmp_path / "data"
    if case == "missing_dir":
        args += ["--instance_data_dir", str(data)]
    elif case == "empty_dir":
        data.mkdir()
        args += ["--instance_data_dir", str(data)]
    elif case == "no_captions":
        data.mkdir()
        (data / "a.jpg").write_bytes((REPO / "data/demo/rocket.jpg").read_bytes())
        args += ["--instance_data_dir", str(data)]
    elif case == "unknown_flag":
        args += ["--learning_rte", "1"]
    elif case == "unknown_key":
        (tmp_path / "c.yaml").write_text("rnak: 4\n")
        args += ["--config", str(tmp_path / "c.yaml")]
    elif case == "resolution":
        args += ["--resolution", "72"]
    elif case == "not_a_pipeline":
        args += ["--pretrained_model_name_or_path", str(tmp_path)]
    elif case == "unknown_family":
        args += _bad_model(tmp_path)
    code, stderr = run_main("train_lora.py", args, capsys)
    assert code == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, stderr[-2000:]
    assert "Loading pipeline components" not in stderr
