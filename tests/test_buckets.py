"""Aspect-ratio buckets: every film and photo frame finds its bucket, batches hold one bucket, runs train and resume
exactly with mixed frames, cached or not, on 1 and 2 processes."""

import json
import math

import pytest
import torch
from PIL import Image

from ddiff_core.buckets import (FRAME_RATIOS, Bucket, BucketError, check_buckets, default_buckets, nearest_bucket,
                                parse_buckets, pixels_kept)
from ddiff_core.data import EpochBatchSampler

from .conftest import assert_resume_from_copy_is_exact, assert_same_training, initial_lora, run_main, run_script, train_args

BUCKETS = ["--use_aspect_ratio_buckets"]


@pytest.mark.parametrize("resolution, multiple", [(1024, 16), (1024, 64), (512, 64), (512, 8), (64, 16)])
@pytest.mark.parametrize("name, ratio", [(n, r) for n, r in FRAME_RATIOS.items()] +
                         [(f"portrait {n}", 1 / r) for n, r in FRAME_RATIOS.items() if r != 1])
def test_every_frame_ratio_lands_in_a_bucket_of_its_shape_and_area(resolution, multiple, name, ratio):
    buckets = default_buckets(resolution, multiple)
    image = (round(3000 * ratio), 3000) if ratio < 1 else (3000, round(3000 / ratio))
    bucket = nearest_bucket(image, buckets)
    assert bucket.height % multiple == 0 and bucket.width % multiple == 0
    if resolution >= 512:  # fine sides: the bucket has the frame's ratio and about resolution² pixels
        assert abs(math.log(bucket.ratio / ratio)) < 0.05, (name, bucket)
        assert abs(bucket.height * bucket.width / resolution**2 - 1) < 0.1, (name, bucket)
    assert bucket == min(buckets, key=lambda b: abs(math.log(b.ratio / ratio)))


def test_buckets_keep_more_of_a_widescreen_frame_than_a_square():
    scope = (2390, 1000)
    assert pixels_kept(scope, Bucket(1024, 1024)) < 0.45
    assert pixels_kept(scope, nearest_bucket(scope, default_buckets(1024, 16))) > 0.95


@pytest.mark.parametrize("text, message", [
    ("64,64;wide", "'wide' is not 'height,width'"),
    ("0,64", "has a zero side"),
    ("64x64", "is not 'height,width'"),
    ("512,512;768,768", "have the same aspect ratio"),
])
def test_bad_bucket_lists_are_one_line_errors(text, message):
    with pytest.raises(BucketError, match=message):
        parse_buckets(text)


def test_bad_buckets_stop_the_script_before_loading(tiny_flux, tmp_path, capsys):
    code, stderr = run_main("train_lora.py", train_args(tiny_flux, tmp_path / "o", "--aspect_ratio_buckets", "48,112;40,64"),
                            capsys)
    assert code == 2 and "40x64 has a side that is not a multiple of 16" in stderr.strip().splitlines()[-1]
    code, stderr = run_main("train_lora.py", train_args(tiny_flux, tmp_path / "o", "--aspect_ratio_buckets", "64;64"), capsys)
    assert code == 2 and "is not 'height,width'" in stderr.strip().splitlines()[-1]
    with pytest.raises(BucketError, match="multiple of 8"):
        check_buckets([Bucket(64, 60)], 8, "sd15")


def test_batches_hold_one_bucket_repeat_the_remainder_and_split_evenly():
    groups = [0] * 7 + [1] * 3 + [2] * 1  # 7 + 3 + 1 items, batch 2: 4 + 2 + 1 batches
    sampler = EpochBatchSampler(len(groups), 2, seed=3, groups=groups)
    batches = sampler.epoch_batches()
    assert len(batches) == 7 and all(len(b) == 2 for b in batches)
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    assert {i for b in batches for i in b} == set(range(11))  # nothing dropped; the remainder is repeated
    assert batches == EpochBatchSampler(len(groups), 2, seed=3, groups=groups).epoch_batches()  # a function of seed
    sampler.set_epoch(1)
    assert sampler.epoch_batches() != batches
    shards = [EpochBatchSampler(len(groups), 2, seed=3, groups=groups, num_replicas=2, rank=r) for r in (0, 1)]
    assert list(shards[0]) == batches[0::2] and list(shards[1]) == batches[1::2] + [batches[0]]  # 7 batches: 4 each
    shards[0].set_epoch(0, skip_batches=1)
    assert list(shards[0]) == batches[0::2][1:]


def test_sdxl_conditioning_uses_the_bucket_crop(tmp_path):
    from ddiff_core.data import ImageCaptionDataset, Record, collate, screen_records
    from ddiff_core.families import get_family

    Image.new("RGB", (300, 100), "red").save(tmp_path / "scope.png")
    records, _ = screen_records([Record("scope.png", "a", tmp_path / "scope.png")])
    for seed in range(40):  # a seed whose crop is off-centre and flipped
        dataset = ImageCaptionDataset(records, resolution=64, seed=seed, with_pixels=True, targets=[(48, 112)],
                                      random_flip=True)
        crop = dataset.crop(0)
        if crop.flip and crop.left not in (0, 144 - 112, (144 - 112) // 2):
            break
    assert crop.flip
    batch = collate([dataset[0]])
    assert batch["pixels"].shape == (1, 3, 48, 112)
    (top, left), = batch["conditioning"]["crop_top_left"].tolist()
    assert top == 0 and left == 144 - 112 - crop.left  # 300x100 covers 112x48 at 144x48; flipped, mirrored
    latents = torch.zeros(1, 4, 6, 14)
    time_ids = get_family("sdxl").added_conditioning({"pooled_prompt_embeds": torch.zeros(1, 32)}, latents,
                                                     batch["conditioning"], 8)["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[100, 300, top, left, 48, 112]]


def test_mixed_frames_train_the_same_cached_or_not_and_report_their_buckets(tiny_flux, tmp_path):
    common = ["--max_train_steps", "8", "--learning_rate", "1e-3", "--random_flip", *BUCKETS,
              "--validation_prompt", "<demo-style> a cat", "--num_validation_images", "1", "--validation_steps", "8",
              "--validation_inference_steps", "2"]
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "cached", *common, "--cache_latents"))
    run_script("train_lora.py", train_args(tiny_flux, tmp_path / "fresh", *common, "--no-cache_text_embeddings"))
    assert_same_training(tmp_path / "cached", tmp_path / "fresh", initial_lora(tiny_flux))
    report = json.loads((tmp_path / "cached" / "buckets.json").read_text())
    used = {b["bucket"] for b in report["buckets"]}
    assert len(used) >= 3 and report["images"] == sum(b["images"] for b in report["buckets"])
    assert report["assignment"]["coffee_scope.jpg"] != report["assignment"]["chelsea_portrait.jpg"]
    grid = Image.open(tmp_path / "cached" / "validation" / "step-000008.png")
    most = max(report["buckets"], key=lambda b: b["images"])["bucket"]
    assert f"{grid.height}x{grid.width}" == most  # one image in the most common bucket's frame


def test_validation_frames_are_the_ones_asked_for(tiny_flux, tmp_path, capsys):
    out = tmp_path / "o"
    run_script("train_lora.py", train_args(tiny_flux, out, "--max_train_steps", "2", *BUCKETS, "--validation_prompt",
                                           "<demo-style> a cat", "--num_validation_images", "1", "--validation_steps",
                                           "2", "--validation_inference_steps", "1",
                                           "--validation_resolution", "48x96,80x48"))
    frames = {p.name: Image.open(p).size for p in (out / "validation").iterdir()}
    assert frames["step-000002-48x96.png"] == (96, 48) and frames["step-000002-80x48.png"] == (48, 80)
    assert frames["final-base-vs-lora-48x96.png"] == (192, 48)  # base and LoRA side by side
    code, stderr = run_main("train_lora.py", train_args(tiny_flux, tmp_path / "p", "--validation_resolution", "40x96"),
                            capsys)
    assert code == 2 and "40x96 has a side that is not a multiple of 16" in stderr.strip().splitlines()[-1]
    code, stderr = run_main("train_lora.py", train_args(tiny_flux, tmp_path / "p", "--validation_resolution", "²x512"),
                            capsys)
    assert code == 2 and "is not HxW" in stderr.strip().splitlines()[-1]


def test_mid_epoch_resume_with_buckets_is_exact(tiny_flux, tmp_path):
    assert_resume_from_copy_is_exact(tiny_flux, tmp_path, ["--max_train_steps", "6", "--checkpointing_steps", "3",
                                                           "--learning_rate", "1e-3", "--cache_latents", *BUCKETS])


def test_two_processes_train_buckets_in_step(tiny_flux, tmp_path):
    out = tmp_path / "ddp"
    run_script("train_lora.py", train_args(tiny_flux, out, "--max_train_steps", "4", "--cache_latents", *BUCKETS),
               processes=2)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["num_processes"] == 2 and len(set(summary["lora_sha256_per_process"])) == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
