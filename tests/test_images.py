"""The image-decoding policy: convert what can be converted, skip the rest with a reason, never crash."""

import io

import numpy as np
import pytest
from PIL import Image

from ddiff_core.data import BadImage, Record, decode_image, screen_records

from .conftest import REPO, run_script, train_args


def _save(path, image, **kw):
    image.save(path, **kw)
    return path


def test_conversions(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert decode_image(_save(tmp_path / "a.png", rgba)).getpixel((0, 0)) == (255, 255, 255)  # onto white
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert decode_image(_save(tmp_path / "c.jpg", cmyk)).mode == "RGB"
    deep = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert decode_image(_save(tmp_path / "d.png", deep)).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (8, 8))
    palette.putpalette([0, 0, 255] * 256)
    assert decode_image(_save(tmp_path / "p.png", palette)).getpixel((0, 0)) == (0, 0, 255)
    rotated = Image.new("RGB", (20, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    assert decode_image(_save(tmp_path / "r.jpg", rotated, exif=exif)).size == (10, 20)
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "g.gif", save_all=True, append_images=frames[1:])
    assert decode_image(tmp_path / "g.gif").getpixel((0, 0))[0] > 200  # the first frame


def test_unusable_files_raise_bad_image_with_a_reason(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buffer.getvalue()[:200])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    Image.new("1", (10_000, 10_000)).save(tmp_path / "bomb.png")  # 100M pixels > Pillow's limit
    for name, reason in [("trunc.jpg", "not a readable image"), ("zero.png", "not a readable image"),
                         ("text.jpg", "not a readable image"), ("bomb.png", "decompression bomb")]:
        with pytest.raises(BadImage, match=reason):
            decode_image(tmp_path / name)


def test_images_over_max_pixels_are_skipped_by_their_header(tmp_path):
    big = Image.new("1", (9400, 9400))  # 88.4 MP: under Pillow's bomb limit, over the 40 MP default
    big.save(tmp_path / "big.png")
    Image.new("RGB", (64, 48), "red").save(tmp_path / "small.png")
    records = [Record(name=n, caption="x", path=tmp_path / n) for n in ("big.png", "small.png")]
    usable, skipped = screen_records(records)
    assert [r.name for r in usable] == ["small.png"] and usable[0].size == (64, 48)
    assert skipped == [("big.png", "9400x9400 = 88.4 MP is over --max_image_pixels 40000000")]
    # Pixels never decoded: the same header over truncated pixel data still gives the size as the reason.
    (tmp_path / "cut.png").write_bytes((tmp_path / "big.png").read_bytes()[:100])
    with pytest.raises(BadImage, match="9400x9400 = 88.4 MP is over --max_image_pixels 40000000"):
        decode_image(tmp_path / "cut.png", max_pixels=40_000_000)
    with pytest.raises(BadImage, match="not a readable image"):
        decode_image(tmp_path / "cut.png")


def _mixed_folder(folder):
    folder.mkdir()
    for name in ("rocket.jpg", "coffee.jpg", "chelsea.jpg", "coins.jpg"):
        (folder / name).write_bytes((REPO / "data/demo" / name).read_bytes())
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("hello")
    Image.new("RGBA", (80, 80), (0, 0, 255, 128)).save(folder / "alpha.png")
    return folder


def test_training_skips_bad_files_and_reports_them(tiny_flux, tmp_path):
    data = _mixed_folder(tmp_path / "data")
    out = tmp_path / "out"
    run_script("train_lora.py", train_args(tiny_flux, out, "--max_train_steps", "2", "--instance_prompt", "<t> still",
                                           data=data))
    report = (out / "skipped_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in report) == ["notes.png", "zero.jpg"]
    assert all("not a readable image" in line for line in report)
    assert (out / "pytorch_lora_weights.safetensors").exists()


def test_nothing_usable_stops_before_loading(tiny_flux, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "zero.jpg").write_bytes(b"")
    result = run_script("train_lora.py", train_args(tiny_flux, tmp_path / "out", "--instance_prompt", "x", data=data),
                        check=False)
    assert result.returncode == 2 and "no usable images" in result.stderr.splitlines()[-1]
    assert "Loading pipeline components" not in result.stderr
