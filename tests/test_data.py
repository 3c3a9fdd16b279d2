import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ddiff_core.data import DataError, EpochBatchSampler, ImageCaptionDataset, load_records

from .conftest import DEMO_DATA


def _cfg(folder, **kw):
    return SimpleNamespace(**{"instance_data_dir": str(folder), "dataset_name": None, "caption_column": None, "instance_prompt": None, **kw})


def _images(folder, names):
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((40, 48, 3), i * 20, np.uint8)).save(folder / name)


def test_demo_folder_reads_metadata_captions():
    records, _ = load_records(_cfg(DEMO_DATA))
    assert len(records) == 12
    assert all("<demo-style>" in r.caption for r in records)
    assert len({r.caption for r in records}) == 12


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


def test_dataset_name_local_folder(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"cap {n}"}) + "\n" for n in ["a.png", "b.png"]))
    cfg = SimpleNamespace(instance_data_dir=None, dataset_name=str(tmp_path), dataset_config_name=None, cache_dir=None,
                          image_column="image", caption_column="text", instance_prompt=None)
    records, dataset = load_records(cfg)
    assert [r.caption for r in records] == ["cap a.png", "cap b.png"]
    item = ImageCaptionDataset(records, resolution=32, dataset=dataset)[1]
    assert item["pixels"].shape == (3, 32, 32) and item["index"] == 1


def test_items_are_fixed_per_record_and_in_range():
    records, _ = load_records(_cfg(DEMO_DATA))
    ds = ImageCaptionDataset(records, resolution=64, random_flip=True, seed=5, repeats=2)
    assert len(ds) == 24
    a, b = ds[3], ds[3 + 12]  # a repeat is the same record, same crop and flip
    assert a["index"] == b["index"] == 3 and torch.equal(a["pixels"], b["pixels"])
    assert a["pixels"].min() >= -1 and a["pixels"].max() <= 1
    assert "pixels" not in ImageCaptionDataset(records, resolution=64, with_pixels=False)[0]


def test_sampler_shards_are_disjoint_reshuffled_and_resumable():
    shards = [EpochBatchSampler(10, 2, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    epoch0 = [list(s) for s in shards]
    seen = [i for shard in epoch0 for batch in shard for i in batch]
    assert len(seen) == len(set(seen)) == 8  # 5 batches -> 2 rounds of 2, the fifth is dropped
    shards[0].set_epoch(1)
    assert list(shards[0]) != epoch0[0]
    shards[0].set_epoch(0, skip_batches=1)
    assert list(shards[0]) == epoch0[0][1:] and len(shards[0]) == 1
    with pytest.raises(DataError, match="cannot fill one batch"):
        EpochBatchSampler(3, 2, seed=0, num_replicas=4)
