import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ddiff_core.data import DataError, EpochBatchSampler, ImageCaptionDataset, load_records, screen_records

from .conftest import DEMO_DATA, DEMO_IMAGES


def _cfg(folder, **kw):
    return SimpleNamespace(**{"instance_data_dir": str(folder), "dataset_name": None, "caption_column": None, "instance_prompt": None, **kw})


def _images(folder, names):
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((40, 48, 3), i * 20, np.uint8)).save(folder / name)


def test_demo_folder_reads_metadata_captions():
    records, _ = load_records(_cfg(DEMO_DATA))
    assert len(records) == DEMO_IMAGES
    assert all("<demo-style>" in r.caption for r in records)
    assert len({r.caption for r in records}) == DEMO_IMAGES


def test_txt_captions_and_instance_prompt_fallback(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.txt").write_text("a caption\n")
    records, _ = load_records(_cfg(tmp_path, instance_prompt="<tok> still"))
    assert [r.caption for r in records] == ["a caption", "<tok> still"]


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "holds no images"),
    (lambda p: _images(p, ["a.png"]), "has no caption"),
    (lambda p: (_images(p, ["a.png"]), (p / "metadata.jsonl").write_text("{not json\n")), "line 1"),
])
def test_bad_folders(tmp_path, setup, message):
    folder = tmp_path / "data"
    setup(folder)
    with pytest.raises(DataError, match=message):
        load_records(_cfg(folder))


def _metadata(folder, *lines):
    (folder / "metadata.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))


@pytest.mark.parametrize("bad_line, message", [
    (b'{"file_name": "b.png", "text": "caf\xe9"}', "line 2 is not UTF-8"),  # Latin-1, not UTF-8
    (b'{"file_name": "b.png", "text": ', "line 2 is not JSON"),
    (b'{"text": "no file name"}', "line 2: needs a JSON object with a string file_name"),
    (b'["b.png", "a list"]', "line 2: needs a JSON object"),
    (b'{"file_name": "b.png", "text": 7}', "line 2: column 'text' holds 7, not a string caption"),
    (b'{"file_name": "b.png", "text": ["a", "b"]}', r"""line 2: column 'text' holds \["a", "b"\], not a string"""),
    (b'{"file_name": "b.png", "text": null}', "line 2: column 'text' holds null, not a string"),
])
def test_bad_metadata_lines_name_file_and_line(tmp_path, bad_line, message):
    _images(tmp_path, ["a.png", "b.png"])
    _metadata(tmp_path, b'{"file_name": "a.png", "text": "fine"}', bad_line)
    with pytest.raises(DataError, match=message) as err:
        load_records(_cfg(tmp_path))
    assert str(tmp_path / "metadata.jsonl") in str(err.value) and "\n" not in str(err.value)


def test_metadata_rows_without_the_caption_column_fall_back(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    _metadata(tmp_path, b'{"file_name": "a.png", "text": "from metadata"}', b'{"file_name": "b.png", "prompt": "p"}')
    (tmp_path / "b.txt").write_text("from the sidecar\n")
    assert [r.caption for r in load_records(_cfg(tmp_path))[0]] == ["from metadata", "from the sidecar"]
    with pytest.raises(DataError, match="no row has the column 'txet'"):  # a misspelt column is not ignored
        load_records(_cfg(tmp_path, caption_column="txet", instance_prompt="x"))


def test_symlinks_leading_outside_the_folder(tmp_path):
    outside, data = tmp_path / "outside", tmp_path / "data"
    _images(outside, ["secret.png"])
    (outside / "secret.txt").write_text("a caption from elsewhere")
    (outside / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "elsewhere"}\n')
    _images(data, ["a.png", "b.png"])
    (data / "c.png").symlink_to("a.png")  # inside the folder: fine
    (data / "d.png").symlink_to(outside / "secret.png")
    records, _ = load_records(_cfg(data, instance_prompt="x"))
    usable, skipped = screen_records(records)
    assert [r.name for r in usable] == ["a.png", "b.png", "c.png"]
    assert skipped == [("d.png", "symlink leads outside the data folder")]
    (data / "b.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(DataError, match=f"{data / 'b.txt'} is a symlink leading outside"):
        load_records(_cfg(data, instance_prompt="x"))
    (data / "b.txt").unlink()
    (data / "metadata.jsonl").symlink_to(outside / "metadata.jsonl")
    with pytest.raises(DataError, match=f"{data / 'metadata.jsonl'} is a symlink leading outside"):
        load_records(_cfg(data, instance_prompt="x"))


def test_screened_records_carry_size_and_content_digest(tmp_path):
    for folder, value in (("one", 10), ("two", 200)):  # same name and size, different pixels
        (tmp_path / folder).mkdir()
        Image.new("RGB", (20, 10), (value,) * 3).save(tmp_path / folder / "a.png")
    (tmp_path / "three").mkdir()
    (tmp_path / "three" / "a.png").write_bytes((tmp_path / "one" / "a.png").read_bytes())
    rotated = Image.new("RGB", (20, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    rotated.save(tmp_path / "three" / "r.jpg", exif=exif)
    records, _ = load_records(_cfg(tmp_path / "one", instance_prompt="x"))
    (one,), _ = screen_records(records)
    (two,), _ = screen_records(load_records(_cfg(tmp_path / "two", instance_prompt="x"))[0])
    three, _ = screen_records(load_records(_cfg(tmp_path / "three", instance_prompt="x"))[0])
    assert records[0].digest is None and one.caption == "x" and one.path == records[0].path
    assert one.size == two.size == (20, 10) and one.digest != two.digest
    assert three[0].digest == one.digest == hashlib.sha256((tmp_path / "one" / "a.png").read_bytes()).hexdigest()
    assert three[1].name == "r.jpg" and three[1].size == (10, 20)


def test_dataset_name_local_folder(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"cap {n}"}) + "\n" for n in ["a.png", "b.png"]))
    cfg = SimpleNamespace(instance_data_dir=None, dataset_name=str(tmp_path), dataset_config_name=None, cache_dir=None,
                          image_column="image", caption_column="text", instance_prompt=None)
    records, dataset = load_records(cfg)
    assert [r.caption for r in records] == ["cap a.png", "cap b.png"]
    item = ImageCaptionDataset(records, resolution=32, dataset=dataset)[1]
    assert item["pixels"].shape == (3, 32, 32) and item["index"] == 1
    usable, _ = screen_records(records, dataset)
    again, _ = screen_records(records, dataset)
    assert [r.size for r in usable] == [(48, 40)] * 2 and [r.digest for r in usable] == [r.digest for r in again]
    assert usable[0].digest != usable[1].digest  # the two images differ in their pixels only
    usable, skipped = screen_records(records, dataset, max_pixels=48 * 40 - 1)
    assert not usable and skipped[0] == ("row 0", "48x40 = 0.0 MP is over --max_image_pixels 1919")


def test_items_are_fixed_per_record_and_in_range():
    records, _ = load_records(_cfg(DEMO_DATA))
    ds = ImageCaptionDataset(records, resolution=64, random_flip=True, seed=5, repeats=2)
    assert len(ds) == 2 * DEMO_IMAGES
    a, b = ds[3], ds[3 + DEMO_IMAGES]  # a repeat is the same record, same crop and flip
    assert a["index"] == b["index"] == 3 and torch.equal(a["pixels"], b["pixels"])
    assert a["pixels"].min() >= -1 and a["pixels"].max() <= 1
    assert "pixels" not in ImageCaptionDataset(records, resolution=64, with_pixels=False)[0]


def test_sampler_shards_are_disjoint_reshuffled_and_resumable():
    shards = [EpochBatchSampler(10, 2, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    epoch0 = [list(s) for s in shards]
    seen = [i for shard in epoch0 for batch in shard for i in batch]
    assert len(seen) == 12 and len(set(seen)) == 10  # 5 batches: the last round is filled with the first batch
    assert len(epoch0[0]) == len(epoch0[1]) == 3
    shards[0].set_epoch(1)
    assert list(shards[0]) != epoch0[0]
    shards[0].set_epoch(0, skip_batches=1)
    assert list(shards[0]) == epoch0[0][1:] and len(shards[0]) == 2
    few = [list(EpochBatchSampler(3, 2, seed=0, num_replicas=4, rank=r)) for r in range(4)]
    assert all(len(batches) == 1 and len(batches[0]) == 2 for batches in few)  # every process has a full batch
    with pytest.raises(DataError, match="no training items"):
        EpochBatchSampler(0, 2, seed=0)


def test_the_holdout_depends_on_seed_and_content_not_order_and_leaves_something_to_train():
    from ddiff_core.data import Record, split_holdout

    records = [Record(name=f"{i}.jpg", caption="c", digest=f"{i:064x}") for i in range(10)]
    train, held = split_holdout(records, 3, seed=0)
    assert len(held) == 3 and len(train) == 7 and {r.name for r in train} | {r.name for r in held} == {r.name for r in records}
    assert split_holdout(list(reversed(records)), 3, seed=0)[1] == list(reversed(held))  # same stills, folder order kept
    assert split_holdout(records, 3, seed=1)[1] != held
    assert len(split_holdout(records, 0.25, seed=0)[1]) == 2  # a fraction: round(2.5) = 2
    with pytest.raises(DataError, match="none would be left to train on"):
        split_holdout(records, 10, seed=0)
