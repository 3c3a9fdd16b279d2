"""Many runs in one launch: the base loaded once, each run's LoRA equal to the one its own launch trains, finished
runs skipped, a killed run resumed, a run with unusable data reported while the others go on."""

import json
import signal
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ddiff_core.config import ConfigError, parse_launch
from ddiff_core.demo_directors import make_directors

from .conftest import kill_tree, run_main, run_script, start_script

SHARED = {"resolution": 64, "train_batch_size": 2, "max_sequence_length": 32, "seed": 0, "report_to": "none",
          "learning_rate": 1e-2, "max_train_steps": 4, "checkpointing_steps": 2, "cache_latents": True}


@pytest.fixture(scope="module")
def directors(tmp_path_factory):
    return make_directors(tmp_path_factory.mktemp("directors"))


def _launch_config(path, model, out, runs, **shared):
    path.write_text(yaml.safe_dump({"pretrained_model_name_or_path": str(model), "output_dir": str(out),
                                    **SHARED, **shared, "runs": runs}))
    return path


def _alone(model, folder, out, *extra):
    """The flags of one director's own launch, with the launch config's shared settings."""
    flags = [f"--{k}={v}" if not isinstance(v, bool) else f"--{k}" for k, v in SHARED.items()]
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(folder), "--output_dir", str(out),
            *flags, *extra]


def _same_lora(a, b, name="pytorch_lora_weights.safetensors"):
    wa, wb = load_file(a / name), load_file(b / name)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_runs_list_is_checked_before_anything_loads(tmp_path, tiny_flux, directors, capsys):
    def launch(runs, **shared):
        path = _launch_config(tmp_path / "l.yaml", tiny_flux, tmp_path / "out", runs, **shared)
        return parse_launch(["--config", str(path)])

    specs = launch([{"name": "teal", "instance_data_dir": str(directors["teal"]), "rank": 8},
                    {"name": "noir", "instance_data_dir": str(directors["noir"])}], rank=4)
    assert [s.name for s in specs] == ["teal", "noir"]
    assert [s.config.rank for s in specs] == [8, 4]  # a run's own key overrides the shared one
    assert specs[1].config.output_dir == str(tmp_path / "out" / "noir")
    assert all(s.config.resume_from_checkpoint == "latest" for s in specs)  # a re-run picks up where it stopped
    for runs, message in [
        ([{"name": "a/../b", "instance_data_dir": "x"}], "folder name"),
        ([{"name": "eval", "instance_data_dir": "x"}], "folder name"),
        ([{"name": "a", "instance_data_dir": "x"}, {"name": "A", "instance_data_dir": "y"}], "twice"),
        ([{"name": "a", "instance_data_dir": "x", "mixed_precision": "bf16"}], "every run of a launch shares"),
        ([{"name": "a", "instance_data_dir": "x", "rnak": 4}], "unknown key 'rnak'"),
        ([{"name": "a"}], "run a: one of --instance_data_dir"),
        ([], "list of 1 to"),
    ]:
        with pytest.raises(ConfigError, match=message):
            launch(runs)
    # The script says so in one line and exits 2, before torch is imported.
    path = _launch_config(tmp_path / "bad.yaml", tiny_flux, tmp_path / "out", [{"name": "a", "rnak": 4}])
    code, err = run_main("train_lora.py", ["--config", str(path)], capsys)
    assert code == 2 and "unknown key 'rnak'" in err and len(err.strip().splitlines()) == 1


def test_three_directors_in_one_launch_equal_three_launches(tmp_path, tiny_flux, directors):
    runs = [{"name": "teal", "instance_data_dir": str(directors["teal"]), "holdout": 2},
            {"name": "pastel", "instance_data_dir": str(directors["pastel"]), "rank": 8, "lora_alpha": 8},
            {"name": "noir", "instance_data_dir": str(directors["noir"]), "use_aspect_ratio_buckets": True,
             "use_ema": True}]
    config = _launch_config(tmp_path / "directors.yaml", tiny_flux, tmp_path / "one", runs)
    result = run_script("train_lora.py", ["--config", str(config)])
    assert "base model loaded once" in result.stdout
    launch = json.loads((tmp_path / "one" / "launch.json").read_text())
    assert [r["status"] for r in launch["runs"]] == ["trained"] * 3

    alone = {"teal": ["--holdout", "2"], "pastel": ["--rank", "8", "--lora_alpha", "8"],
             "noir": ["--use_aspect_ratio_buckets", "--use_ema"]}
    for name, extra in alone.items():
        run_script("train_lora.py", _alone(tiny_flux, directors[name], tmp_path / "three" / name, *extra))
        assert _same_lora(tmp_path / "one" / name, tmp_path / "three" / name), name
    assert _same_lora(tmp_path / "one" / "noir", tmp_path / "three" / "noir", "pytorch_lora_weights_ema.safetensors")
    held = [json.loads(line) for line in (tmp_path / "one" / "teal" / "holdout.jsonl").read_text().splitlines()]
    assert len(held) == 2 and held == [json.loads(line) for line in
                                       (tmp_path / "three" / "teal" / "holdout.jsonl").read_text().splitlines()]
    # The held-out stills were not trained on: the run's identity names the data it trained.
    run = json.loads((tmp_path / "one" / "teal" / "run.json").read_text())
    assert run["settings"]["data"] != json.loads((tmp_path / "one" / "noir" / "run.json").read_text())["settings"]["data"]

    # Run again: every director is found finished and nothing loads.
    again = run_script("train_lora.py", ["--config", str(config)])
    assert again.stdout.count("finished earlier") == 3 and "base model not loaded" in again.stdout


def test_a_rerun_after_a_kill_skips_finished_runs_and_resumes_the_killed_one(tmp_path, tiny_flux, directors):
    runs = [{"name": name, "instance_data_dir": str(directors[name])} for name in ("teal", "pastel", "noir")]
    runs[1]["max_train_steps"] = 60  # long enough to be killed in the middle
    config = _launch_config(tmp_path / "directors.yaml", tiny_flux, tmp_path / "one", runs)
    proc = start_script("train_lora.py", ["--config", str(config)])
    deadline = time.time() + 240
    while not (tmp_path / "one" / "pastel" / "checkpoint-2").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    kill_tree(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "one" / "pastel" / "pytorch_lora_weights.safetensors").exists()
    assert not (tmp_path / "one" / "noir" / "pytorch_lora_weights.safetensors").exists()

    result = run_script("train_lora.py", ["--config", str(config)])
    assert "finished earlier" in result.stdout
    launch = json.loads((tmp_path / "one" / "launch.json").read_text())
    assert [r["status"] for r in launch["runs"]] == ["finished earlier", "trained", "trained"]
    for name, extra in [("pastel", ["--max_train_steps", "60"]), ("noir", [])]:
        run_script("train_lora.py", _alone(tiny_flux, directors[name], tmp_path / "alone" / name, *extra))
        assert _same_lora(tmp_path / "one" / name, tmp_path / "alone" / name), name


def test_a_director_without_usable_images_is_reported_and_the_others_train(tmp_path, tiny_flux, directors):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    (broken / "a.txt").write_text("<broken-style> a still")
    runs = [{"name": "broken", "instance_data_dir": str(broken)},
            # fails once its LoRA is being added, after the base is shared: the next run must find the base clean
            {"name": "nolayers", "instance_data_dir": str(directors["teal"]), "lora_layers": "no_such_module"},
            {"name": "noir", "instance_data_dir": str(directors["noir"])},
            {"name": "missing", "instance_data_dir": str(tmp_path / "nowhere")}]
    config = _launch_config(tmp_path / "directors.yaml", tiny_flux, tmp_path / "one", runs)
    result = run_script("train_lora.py", ["--config", str(config)], check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "run broken: no usable images" in errors[0], errors
    assert "run nolayers: --lora_layers 'no_such_module' matches no layer" in errors[1] and "run missing:" in errors[2]
    assert (tmp_path / "one" / "noir" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "one" / "broken" / "pytorch_lora_weights.safetensors").exists()
    assert [r["status"] for r in json.loads((tmp_path / "one" / "launch.json").read_text())["runs"]] == [
        "failed", "failed", "trained", "failed"]
    # noir trained on a clean base: the same LoRA as its own launch
    run_script("train_lora.py", _alone(tiny_flux, directors["noir"], tmp_path / "alone"))
    assert _same_lora(tmp_path / "one" / "noir", tmp_path / "alone")


def test_two_directors_under_ddp_equal_their_own_ddp_launch(tmp_path, tiny_flux, directors):
    runs = [{"name": name, "instance_data_dir": str(directors[name])} for name in ("teal", "noir")]
    config = _launch_config(tmp_path / "directors.yaml", tiny_flux, tmp_path / "one", runs)
    run_script("train_lora.py", ["--config", str(config)], processes=2)
    summary = json.loads((tmp_path / "one" / "noir" / "run_summary.json").read_text())
    assert summary["num_processes"] == 2 and len(set(summary["lora_sha256_per_process"])) == 1
    run_script("train_lora.py", _alone(tiny_flux, directors["noir"], tmp_path / "alone" / "noir"), processes=2)
    assert _same_lora(tmp_path / "one" / "noir", tmp_path / "alone" / "noir")
