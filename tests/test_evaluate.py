"""scripts/evaluate.py: base vs LoRA images from one pipeline, scored with a CLIP model, deterministic and resumable;
and its metrics on inputs whose answer is known."""

import json

import pytest
import torch
import yaml

from ddiff_core.demo_directors import make_directors
from ddiff_core.evaluation import (centroid, confusion_matrix, cosine_to, nearest_centroid, normalize, plain_prompt)
from ddiff_core.tiny import save_tiny_clip_model

from .conftest import run_main, run_script


def test_the_reference_set_itself_is_the_most_similar_set():
    torch.manual_seed(0)
    references = normalize(torch.randn(1, 16) + 0.3 * torch.randn(12, 16))
    others = [normalize(torch.randn(12, 16)), normalize(references + 0.5 * torch.randn(12, 16))]
    own = cosine_to(references, centroid(references)).mean()
    assert all(cosine_to(o, centroid(references)).mean() < own for o in others)
    assert torch.allclose(cosine_to(references, references), torch.ones(12))  # row-wise form


def test_perfectly_separated_embeddings_give_a_diagonal_confusion_matrix():
    torch.manual_seed(0)
    axes = torch.eye(16)[:3] * 5
    clusters = [axes[k] + 0.1 * torch.randn(8, 16) for k in range(3)]
    centroids = torch.stack([centroid(c) for c in clusters])
    true = [k for k in range(3) for _ in range(8)]
    predicted = nearest_centroid(torch.cat(clusters), centroids).tolist()
    assert confusion_matrix(true, predicted, 3) == [[8, 0, 0], [0, 8, 0], [0, 0, 8]]
    # and a set assigned all to one director is a single column
    assert confusion_matrix(true, [1] * 24, 3) == [[0, 8, 0], [0, 8, 0], [0, 8, 0]]


def test_trigger_tokens_are_not_part_of_the_prompt_clip_reads():
    assert plain_prompt("<noir-style> a cat on a table, in <noir-style> style") == "a cat on a table, in style"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_flux):
    root = tmp_path_factory.mktemp("evaluate")
    directors = make_directors(root / "data", names=("teal", "noir"))
    config = root / "directors.yaml"
    config.write_text(yaml.safe_dump({
        "pretrained_model_name_or_path": str(tiny_flux), "output_dir": str(root / "loras"), "resolution": 64,
        "train_batch_size": 2, "max_train_steps": 6, "learning_rate": 1e-2, "max_sequence_length": 32, "seed": 0,
        "report_to": "none", "cache_latents": True, "holdout": 3, "use_ema": True, "ema_decay": 0.5,
        "runs": [{"name": n, "instance_data_dir": str(directors[n]),
                  "validation_prompt": f"<{n}-style> a cat on a table|<{n}-style> a rocket at night"}
                 for n in ("teal", "noir")]}))
    run_script("train_lora.py", ["--config", str(config)])
    return root, save_tiny_clip_model(root / "clip")


def _evaluate(capsys, loras, out, clip, *extra):
    return run_main("evaluate.py", ["--lora_dir", str(loras), "--output_dir", str(out), "--clip_model", str(clip),
                                    "--seeds", "0,1", "--num_inference_steps", "2", *extra], capsys)


def test_evaluation_writes_a_deterministic_report_and_resumes_per_lora(trained, tmp_path, capsys):
    root, clip = trained
    code, err = _evaluate(capsys, root / "loras", tmp_path / "a", clip)
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert list(report["directors"]) == ["noir", "teal"]
    for name, d in report["directors"].items():
        assert d["images"] == 4 and d["references"] == "3 held-out stills"
        for metric in ("style_similarity", "prompt_adherence", "identified_as_own"):
            assert set(d[metric]) == {"base", "lora"} and all(-1 <= v <= 1 for v in d[metric].values())
        # the LoRA changed its images (a learning rate of 1e-2 for 6 steps), the base images are the adapter-off ones
        assert d["style_similarity"]["base"] != d["style_similarity"]["lora"]
        assert (tmp_path / "a" / name / "contact_sheet.png").is_file()
        assert len(list((tmp_path / "a" / name / "images").glob("*.png"))) == 8
    assert sum(map(sum, report["confusion"]["lora"])) == 8
    for name in ("report.md", "style_similarity.png", "confusion.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert "| style similarity |" in (tmp_path / "a" / "report.md").read_text()

    # Twice from scratch: the same numbers.
    assert _evaluate(capsys, root / "loras", tmp_path / "b", clip)[0] == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["directors"] == report["directors"]

    # A re-run reuses each LoRA already evaluated with these settings; a removed one is evaluated again.
    kept = (tmp_path / "a" / "noir" / "embeddings.safetensors").stat().st_mtime_ns
    (tmp_path / "a" / "teal" / "done.json").unlink()
    assert _evaluate(capsys, root / "loras", tmp_path / "a", clip)[0] == 0
    assert (tmp_path / "a" / "noir" / "embeddings.safetensors").stat().st_mtime_ns == kept
    assert (tmp_path / "a" / "teal" / "done.json").is_file()
    assert json.loads((tmp_path / "a" / "report.json").read_text()) == report
    # Other settings are another evaluation, not a reuse.
    assert _evaluate(capsys, root / "loras", tmp_path / "a", clip, "--seeds", "0")[0] == 0
    assert json.loads((tmp_path / "a" / "report.json").read_text())["directors"]["noir"]["images"] == 2


def test_the_ema_weights_are_evaluated_when_asked(trained, tmp_path, capsys):
    root, clip = trained
    assert _evaluate(capsys, root / "loras", tmp_path / "final", clip)[0] == 0
    code, err = run_main("evaluate.py", ["--lora_dir", str(root / "loras"), "--clip_model", str(clip), "--seeds", "0,1",
                                         "--num_inference_steps", "2", "--weights", "ema"], capsys)
    assert code == 0, err
    final, ema = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "final", root / "loras" / "eval-ema"))
    assert final["weights"] == "final" and ema["weights"] == "ema"
    for name in ("noir", "teal"):  # the same base images; the LoRA images from another set of weights
        a, b = final["directors"][name]["style_similarity"], ema["directors"][name]["style_similarity"]
        assert a["base"] == b["base"] and a["lora"] != b["lora"]
    lone = tmp_path / "lone"  # a run without an EMA
    lone.mkdir()
    for f in (root / "loras" / "noir").iterdir():
        if f.is_file() and f.name != "pytorch_lora_weights_ema.safetensors":
            (lone / f.name).write_bytes(f.read_bytes())
    code, err = _evaluate(capsys, lone, tmp_path / "x", clip, "--weights", "ema")
    assert code == 2 and "lone: no pytorch_lora_weights_ema.safetensors" in err and len(err.strip().splitlines()) == 1
    mixed = tmp_path / "mixed"  # a launch folder where one run has no EMA: refused, not evaluated among fewer
    mixed.mkdir()
    lone.rename(mixed / "lone")
    (mixed / "teal").symlink_to(root / "loras" / "teal")  # a symlinked LoRA folder is listed, then refused
    code, err = _evaluate(capsys, mixed, tmp_path / "x", clip, "--weights", "ema")
    assert code == 2 and "lone: no pytorch_lora_weights_ema" in err


def test_results_planted_in_a_received_output_folder_are_evaluated_again(trained, tmp_path, capsys, monkeypatch):
    root, clip = trained
    out = tmp_path / "out"
    assert _evaluate(capsys, root / "loras", out, clip)[0] == 0
    report = json.loads((out / "report.json").read_text())
    # The same folder on another machine (another local key): its done.json files are not this machine's, so each
    # LoRA is generated and scored again, to the same numbers.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    stamps = {n: (out / n / "embeddings.safetensors").stat().st_mtime_ns for n in ("noir", "teal")}
    (out / "teal" / "done.json").unlink()
    (out / "teal" / "done.json").symlink_to("/dev/zero")  # read, it would never end
    assert _evaluate(capsys, root / "loras", out, clip)[0] == 0
    assert all((out / n / "embeddings.safetensors").stat().st_mtime_ns != stamps[n] for n in stamps)
    assert not (out / "teal" / "done.json").is_symlink()
    assert json.loads((out / "report.json").read_text())["directors"] == report["directors"]


def test_evaluation_refuses_bad_input_in_one_line(trained, tmp_path, capsys):
    root, clip = trained
    single = root / "loras" / "noir"
    for extra, message in [
        (["--seeds", "0,0"], "--seeds"),
        (["--reference_dir", str(tmp_path / "empty")], "no usable reference images"),
        (["--clip_model", str(tmp_path / "nowhere")], "--clip_model"),
    ]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        code, err = _evaluate(capsys, single, tmp_path / "out", clip, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, err = _evaluate(capsys, tmp_path, tmp_path / "out", clip)
    assert code == 2 and "no LoRA in" in err


def test_a_received_lora_folder_cannot_redirect_or_exhaust_the_evaluation(trained, tmp_path, capsys):
    import shutil

    root, clip = trained
    lora = tmp_path / "received"
    shutil.copytree(root / "loras" / "noir", lora, ignore=shutil.ignore_patterns("checkpoint-*", "cache", "logs"))
    config = lora / "training_config.yaml"
    original = config.read_text()

    def attempt(text, *extra):
        config.write_text(text)
        code, err = _evaluate(capsys, lora, tmp_path / "out", clip, *extra)
        return code, err.strip().splitlines()[-1] if err.strip() else ""

    # a few lines of nested aliases would expand to gigabytes
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    code, last = attempt(original + bomb + "validation_prompt: [*b, *b, *b, *b, *b, *b, *b, *b]\n")
    assert code == 2 and "anchors or aliases" in last and len(last) < 400
    # a base model that is not a pipeline folder is refused before anything under it is read
    code, last = attempt(original + "\npretrained_model_name_or_path: /usr\n")  # the later key wins
    assert code == 2 and "not a diffusers pipeline folder" in last
    config.write_text(original)
    # an output folder that is a symlink elsewhere is not written through
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "out").symlink_to(victim)
    code, err = _evaluate(capsys, lora, tmp_path / "out", clip, "--reference_dir", str(root / "data" / "noir"))
    assert code == 2 and "symlink" in err and not any(victim.iterdir())
