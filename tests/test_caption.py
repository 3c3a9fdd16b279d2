"""scripts/caption.py: the real vision-language path on a tiny model, the template captioner, resume, bad files."""

import json
import shutil
import signal
import time

import numpy as np
import pytest
from PIL import Image

from ddiff_core.captioning import REGISTRY
from ddiff_core.captioning.runner import place_trigger

from .conftest import DEMO_DATA, REPO, run_script, start_script, train_args


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    from ddiff_core.captioning.vlm import VisionLanguageCaptioner

    return VisionLanguageCaptioner.build_tiny(tmp_path_factory.mktemp("models") / "tiny-vlm")


def _stills(folder, copies=1):
    folder.mkdir()
    for path in sorted(DEMO_DATA.glob("*.jpg")):
        for i in range(copies):
            shutil.copy(path, folder / f"{path.stem}_{i:03d}.jpg")
    return folder


def _rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_vision_language_captioner_batched_with_trigger(tiny_vlm, tmp_path):
    stills = _stills(tmp_path / "stills")
    result = run_script("caption.py", ["--input_dir", str(stills), "--trigger_phrase", "<nolan-style>", "--model",
                                       str(tiny_vlm), "--batch_size", "5", "--max_words", "6", "--max_new_tokens", "8"])
    rows = _rows(stills)
    assert sorted(r["file_name"] for r in rows) == sorted(p.name for p in stills.glob("*.jpg"))
    for row in rows:
        assert row["text"].startswith("<nolan-style> ") and row["text"].endswith(", in <nolan-style> style")
        body = row["text"][len("<nolan-style> "):-len(", in <nolan-style> style")]
        assert len(body.split()) <= 6 and all(ch.isprintable() for ch in body)
    assert "captioned 12 images" in result.stdout and "images/s" in result.stdout


def test_batched_captions_equal_one_by_one(tiny_vlm):
    captioner = REGISTRY.load("qwen2.5-vl")(model=str(tiny_vlm), max_new_tokens=8)
    images = [Image.open(p).convert("RGB") for p in sorted(DEMO_DATA.glob("*.jpg"))[:4]]
    assert captioner.caption(images, ["a"] * 4) == [captioner.caption([i], ["a"])[0] for i in images]


def test_template_captioner_and_trigger_placements(tmp_path):
    stills = _stills(tmp_path / "stills")
    run_script("caption.py", ["--input_dir", str(stills), "--captioner", "template", "--trigger_phrase", "<t>",
                              "--trigger_placement", "start"])
    texts = {r["file_name"]: r["text"] for r in _rows(stills)}
    assert texts["rocket_000.jpg"] == "<t> rocket"
    assert place_trigger("a cat", "<t>", "none") == "a cat"
    assert place_trigger("a cat", "<t>", "start_end") == "<t> a cat, in <t> style"


def test_killed_run_resumes_and_captions_every_image_exactly_once(tiny_vlm, tmp_path):
    stills = _stills(tmp_path / "stills", copies=15)  # 180 images
    args = ["--input_dir", str(stills), "--model", str(tiny_vlm), "--batch_size", "2", "--max_new_tokens", "24"]
    proc = start_script("caption.py", args)
    metadata = stills / "metadata.jsonl"
    while not (metadata.exists() and len(metadata.read_text().splitlines()) >= 10):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r["file_name"]: r["text"] for r in _rows(stills)}  # whole rows: the file was replaced atomically
    assert 10 <= len(before) < 180
    result = run_script("caption.py", args)
    after = {r["file_name"]: r["text"] for r in _rows(stills)}
    assert len(after) == 180 and all(after[name] == text for name, text in before.items())
    assert f"captioned {180 - len(before)} images" in result.stdout and f"kept {len(before)} existing" in result.stdout
    assert not list(stills.glob(".metadata.jsonl.tmp"))


def test_bad_files_are_reported_and_odd_modes_converted(tmp_path):
    stills = tmp_path / "stills"
    stills.mkdir()
    Image.new("RGBA", (40, 40), (255, 0, 0, 100)).save(stills / "alpha.png")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(stills / "deep.png")
    Image.new("CMYK", (40, 40)).save(stills / "cmyk.jpg")
    (stills / "empty.jpg").write_bytes(b"")
    (stills / "notes.png").write_text("not an image")
    result = run_script("caption.py", ["--input_dir", str(stills), "--captioner", "template", "--text", "a still"])
    assert sorted(r["file_name"] for r in _rows(stills)) == ["alpha.png", "cmyk.jpg", "deep.png"]
    assert "bad file: empty.jpg" in result.stdout and "bad file: notes.png" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--captioner", "template"], "holds no images"),
    (["--trust_remote_code", "--model", "x"], "needs a pinned --revision"),
])
def test_bad_input_is_a_one_line_error(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    result = run_script("caption.py", ["--input_dir", str(tmp_path / "empty"), *args], check=False)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]


def test_captions_train(tiny_flux, tmp_path):
    stills = _stills(tmp_path / "stills")
    run_script("caption.py", ["--input_dir", str(stills), "--captioner", "template", "--trigger_phrase", "<t>"])
    out = tmp_path / "lora"
    run_script("train_lora.py", train_args(tiny_flux, out, "--max_train_steps", "2", data=stills))
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert 'instance_prompt: "<t>"' in (out / "README.md").read_text()
