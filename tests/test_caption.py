"""scripts/caption.py: the real vision-language path on a tiny model, the template captioner, resume, bad files."""

import json
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ddiff_core.captioning import REGISTRY
from ddiff_core.captioning.runner import caption_folder, place_trigger
from ddiff_core.captioning.template import TemplateCaptioner
from ddiff_core.captioning.vlm import VisionLanguageCaptioner
from ddiff_core.data import DataError

from .conftest import DEMO_DATA, DEMO_IMAGES, run_main, run_script, start_script, train_args


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
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
    assert f"captioned {DEMO_IMAGES} images" in result.stdout and "images/s" in result.stdout


def _assert_left_padded_and_rows_as_if_alone(model, batch, singles):
    mask = batch["attention_mask"]
    assert torch.equal(mask, mask.cummax(dim=1).values)  # per row: padding zeros only before the first one
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        for row, single in zip(batched, singles, strict=True):
            torch.testing.assert_close(row, model(**single).logits[0, -1])


def test_a_batch_is_left_padded_and_each_row_predicts_as_if_alone(tiny_vlm):
    # Generated strings are not compared: greedy decoding amplifies float differences that batch composition
    # causes on CPU. What batching must preserve is each row's next-token distribution; float32 defaults suffice.
    captioner = REGISTRY.load("qwen2.5-vl")(model=str(tiny_vlm), max_new_tokens=8)
    images = [Image.open(p).convert("RGB") for p in sorted(DEMO_DATA.glob("*.jpg"))[:4]]
    _assert_left_padded_and_rows_as_if_alone(
        captioner.model, captioner.build_inputs(images), [captioner.build_inputs([image]) for image in images])
    # The tiny LLaVA gives every image the same number of tokens (Qwen2.5-VL does not), so the rows above are of
    # one length; two prompts of different lengths through the captioner's processor make the padding real.
    chats = [captioner.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
        add_generation_prompt=True, tokenize=False) for text in ("Describe it.", captioner.prompt)]
    padded = captioner.processor(text=chats, images=images[:2], padding=True, return_tensors="pt")
    assert padded["attention_mask"][0, 0] == 0  # the short row really is padded
    singles = [captioner.processor(text=[chat], images=[image], return_tensors="pt") for chat, image in zip(chats, images)]
    _assert_left_padded_and_rows_as_if_alone(captioner.model, padded, singles)


def test_template_captioner_and_trigger_placements(tmp_path):
    stills = _stills(tmp_path / "stills")
    run_script("caption.py", ["--input_dir", str(stills), "--captioner", "template", "--trigger_phrase", "<t>",
                              "--trigger_placement", "start"])
    texts = {r["file_name"]: r["text"] for r in _rows(stills)}
    assert texts["rocket_000.jpg"] == "<t> rocket"
    assert place_trigger("a cat", "<t>", "none") == "a cat"
    assert place_trigger("a cat", "<t>", "start_end") == "<t> a cat, in <t> style"


def test_killed_run_resumes_and_captions_every_image_exactly_once(tiny_vlm, tmp_path):
    stills = _stills(tmp_path / "stills", copies=10)
    total = 10 * DEMO_IMAGES
    args = ["--input_dir", str(stills), "--model", str(tiny_vlm), "--batch_size", "2", "--max_new_tokens", "24"]
    proc = start_script("caption.py", args)
    metadata = stills / "metadata.jsonl"
    while not (metadata.exists() and len(metadata.read_text().splitlines()) >= 10):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r["file_name"]: r["text"] for r in _rows(stills)}  # whole rows: the file was replaced atomically
    assert 10 <= len(before) < total
    result = run_script("caption.py", args)
    after = {r["file_name"]: r["text"] for r in _rows(stills)}
    assert len(after) == total and all(after[name] == text for name, text in before.items())
    assert f"captioned {total - len(before)} images" in result.stdout and f"kept {len(before)} existing" in result.stdout
    assert not list(stills.glob(".metadata.jsonl*.tmp"))


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
    (["--trust_remote_code", "--model", "x"], "needs --revision pinned to a full commit hash"),
    (["--trust_remote_code", "--model", "x", "--revision", "main"], "got 'main'"),
    (["--trust_remote_code", "--model", "x", "--revision", "0123456789abcdef" * 2], "got '0123"),  # 32 digits
    (["--trust_remote_code", "--model", "x", "--revision", "0123456789" * 4], "holds no images"),  # pinned: passes
    (["--captioner", "template", "--caption_column", "file_name"], "other than file_name"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    code, stderr = run_main("caption.py", ["--input_dir", str(tmp_path / "empty"), *args], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr


def test_captioner_refuses_remote_code_on_a_branch(tmp_path):
    with pytest.raises(ValueError, match="got 'main'"):  # before anything is loaded from the (missing) model
        VisionLanguageCaptioner(model=str(tmp_path / "no-model"), trust_remote_code=True, revision="main")


def _lines(folder):
    return [list(json.loads(line).items()) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_captioning_keeps_every_row_and_field_it_did_not_write(tmp_path):
    stills = tmp_path / "stills"
    stills.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "e.jpg", "d.jpg"):
        shutil.copy(DEMO_DATA / "rocket.jpg", stills / name)
    old = [
        {"file_name": "gone.jpg", "text": "a file since deleted", "source": "web"},
        {"file_name": "c.jpg", "prompt": "captioned in another column", "aesthetic_score": 6.25},
        {"file_name": "a.jpg", "text": "already captioned", "aesthetic_score": 5},
        {"file_name": "b.jpg", "source": "scan", "text": None},
        {"file_name": "odd.jpg", "text": 7, "tags": ["x", 1.5], "note": None},
    ]
    (stills / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in old))
    result = caption_folder(stills, TemplateCaptioner(text="new"), trigger=None, batch_size=2, show_progress=False)
    assert result["captioned"] == 4 and result["skipped_existing"] == 1
    assert _lines(stills) == [
        list(old[0].items()),
        [("file_name", "c.jpg"), ("prompt", "captioned in another column"), ("aesthetic_score", 6.25), ("text", "new")],
        list(old[2].items()),
        [("file_name", "b.jpg"), ("source", "scan"), ("text", "new")],
        list(old[4].items()),
        [("file_name", "d.jpg"), ("text", "new")],  # new rows follow, in file-name order
        [("file_name", "e.jpg"), ("text", "new")],
    ]
    before = _lines(stills)
    result = run_script("caption.py", ["--input_dir", str(stills), "--captioner", "template", "--text", "p",
                                       "--caption_column", "prompt"])
    assert "captioned 4 images" in result.stdout and "kept 1 existing" in result.stdout
    after = _lines(stills)
    assert after[1] == before[1] and after[0] == before[0] and after[4] == before[4]
    assert [dict(row).get("prompt") for row in after] == [None, "captioned in another column", "p", "p", None, "p", "p"]
    result = caption_folder(stills, TemplateCaptioner(text="again"), trigger=None, show_progress=False)
    assert result["captioned"] == 0 and _lines(stills) == after  # the prompt column survives the default column


@pytest.mark.parametrize("content, message", [
    (b'{"file_name": "a.jpg", "text": "ok"}\n{"file_name": "b.jpg", "text": "caf\xe9"}\n', "line 2 is not UTF-8"),
    (b'{"file_name": "a.jpg", "text": "ok"}\n{"file_name": "b.jpg", \n', "line 2 is not JSON"),
    (b'\n{"text": "no file name"}\n', "line 2: needs a JSON object with a string file_name"),
])
def test_captioning_refuses_metadata_it_would_lose_rows_of(tmp_path, capsys, content, message):
    stills = _stills(tmp_path / "stills")
    (stills / "metadata.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        caption_folder(stills, TemplateCaptioner(), trigger=None, show_progress=False)
    code, stderr = run_main("caption.py", ["--input_dir", str(stills), "--captioner", "template"], capsys)
    assert code == 2 and message in stderr and str(stills / "metadata.jsonl") in stderr
    assert (stills / "metadata.jsonl").read_bytes() == content


def test_captioning_refuses_metadata_linked_from_outside(tmp_path):
    stills = _stills(tmp_path / "stills")
    (tmp_path / "elsewhere.jsonl").write_text('{"file_name": "a.jpg", "text": "x"}\n')
    (stills / "metadata.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(DataError, match="is a symlink leading outside the data folder"):
        caption_folder(stills, TemplateCaptioner(), trigger=None, show_progress=False)
    assert (tmp_path / "elsewhere.jsonl").read_text() == '{"file_name": "a.jpg", "text": "x"}\n'


def test_captions_train(tiny_flux, tmp_path):
    stills = _stills(tmp_path / "stills")
    run_script("caption.py", ["--input_dir", str(stills), "--captioner", "template", "--trigger_phrase", "<t>"])
    out = tmp_path / "lora"
    run_script("train_lora.py", train_args(tiny_flux, out, "--max_train_steps", "2", data=stills))
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert 'instance_prompt: "<t>"' in (out / "README.md").read_text()
