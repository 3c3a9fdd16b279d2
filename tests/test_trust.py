"""Trusting a run: checkpoints never unpickle, one run per output folder, caches keyed by the data itself."""

import hashlib
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddiff_core.checkpoint import MANIFEST, CheckpointError, Checkpointer

from .conftest import run_main, run_script, train_args

RUN = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--cache_latents"]


class Payload:
    """Unpickling this creates ``marker``: proof that a load ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rewrite_manifest(checkpoint):
    """What an attacker would do: make the manifest match the planted files."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = {p.name: {"size": p.stat().st_size, "sha256": _sha(p)}
                         for p in sorted(checkpoint.iterdir()) if p.name != MANIFEST}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def trained(tiny_flux, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "out"
    run_script("train_lora.py", train_args(tiny_flux, out, *RUN))
    return out


@pytest.mark.parametrize("planted", ["lora.safetensors", "optimizer.safetensors", "scheduler.json",
                                     "rng-0.safetensors", MANIFEST])
def test_a_planted_pickle_never_runs_and_the_error_names_the_file(trained, tiny_flux, tmp_path, capsys, planted):
    out = tmp_path / "out"
    shutil.copytree(trained / "checkpoint-2", out / "checkpoint-2")
    shutil.copy(trained / "run.json", out / "run.json")
    marker = tmp_path / "payload-ran"
    (out / "checkpoint-2" / planted).write_bytes(pickle.dumps(Payload(marker)))
    if planted != MANIFEST:
        _rewrite_manifest(out / "checkpoint-2")
    code, stderr = run_main("train_lora.py", train_args(tiny_flux, out, *RUN, "--resume_from_checkpoint",
                                                        str(out / "checkpoint-2")), capsys)
    assert not marker.exists()
    last = stderr.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and planted in last, stderr[-2000:]


def test_stray_pickles_are_never_loaded_and_resume_is_exact(trained, tiny_flux, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained / "checkpoint-2", out / "checkpoint-2")
    shutil.copy(trained / "run.json", out / "run.json")
    marker = tmp_path / "payload-ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "pytorch_model.bin",
                 "training_rng_0.pt"):  # what accelerate's save_state wrote; listed in the manifest too
        (out / "checkpoint-2" / name).write_bytes(pickle.dumps(Payload(marker)))
    _rewrite_manifest(out / "checkpoint-2")
    run_script("train_lora.py", train_args(tiny_flux, out, *RUN, "--resume_from_checkpoint", "latest"))
    assert not marker.exists()
    a, b = (load_file(o / "pytorch_lora_weights.safetensors") for o in (out, trained))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_fresh_run_into_an_old_runs_folder_stops_before_loading(trained, tiny_flux, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, stderr = run_main("train_lora.py", train_args(tiny_flux, out, *RUN), capsys)
    assert code == 2 and "already holds a run" in stderr.strip().splitlines()[-1]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    assert "Loading pipeline components" not in stderr
    # a resume with other settings names what differs
    code, stderr = run_main("train_lora.py", train_args(tiny_flux, out, *RUN, "--rank", "8",
                                                        "--resume_from_checkpoint", "latest"), capsys)
    assert code == 2 and "holds another run (differs in rank: 4 -> 8)" in stderr.strip().splitlines()[-1]


def test_a_checkpoint_of_another_run_named_by_path_is_refused(trained, tiny_flux, tmp_path, capsys):
    code, stderr = run_main("train_lora.py", train_args(tiny_flux, tmp_path / "new", *RUN, "--learning_rate", "5e-4",
                                                        "--resume_from_checkpoint", str(trained / "checkpoint-2")), capsys)
    last = stderr.strip().splitlines()[-1]
    assert code == 2 and "belongs to another run" in last and "learning_rate: 0.001 -> 0.0005" in last


def test_overwrite_clears_the_old_run_and_pruning_keeps_to_this_run(trained, tiny_flux, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    for step in (500, 1000):  # an older run's late checkpoints must not count against this run's limit
        shutil.copytree(out / "checkpoint-2", out / f"checkpoint-{step}")
    (out / "notes.txt").write_text("mine")  # not ddiff's: stays
    run_script("train_lora.py", train_args(tiny_flux, out, "--max_train_steps", "6", "--checkpointing_steps", "2",
                                           "--checkpoints_total_limit", "2", "--overwrite_output_dir"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (out / "notes.txt").exists() and (out / "cache").is_dir()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6
    # Another run's checkpoints planted afterwards are invisible to this run's 'latest' and its pruning.
    other = out / "checkpoint-900"
    shutil.copytree(out / "checkpoint-6", other)
    _edit_manifest(other, lambda m: m.update(global_step=900, run={**m["run"], "fingerprint": "someone-else"}))
    (out / "checkpoint-1000").mkdir()  # a stray folder without a manifest: neither resumed nor counted nor pruned
    result = run_script("train_lora.py", train_args(tiny_flux, out, "--max_train_steps", "8", "--checkpointing_steps", "2",
                                                    "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest"))
    assert "resumed from" in result.stderr and "checkpoint-6" in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1000", "checkpoint-6", "checkpoint-8",
                                                                "checkpoint-900"]


def _imagefolder(root, seed):
    root.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"<t> still {i}"}) + "\n"
                                                 for i in range(2)))
    return root


def test_datasets_of_equal_length_never_share_latents(tiny_flux, tmp_path):
    """Same length, same captions, other pixels: the cache keys on the data's content, not its row numbers."""
    cache = tmp_path / "shared-cache"
    for name, seed in (("a", 1), ("b", 2)):
        data = _imagefolder(tmp_path / f"data-{name}", seed)
        args = train_args(tiny_flux, tmp_path / f"out-{name}", "--max_train_steps", "1", "--cache_latents",
                          "--feature_cache_dir", str(cache), "--center_crop")
        args[args.index("--instance_data_dir"):args.index("--instance_data_dir") + 2] = ["--dataset_name", str(data),
                                                                                       "--caption_column", "text"]
        run_script("train_lora.py", args)
    latents = sorted(cache.glob("latents-*.safetensors"))
    assert len(latents) == 2
    a, b = (load_file(p) for p in latents)
    assert a.keys() == b.keys() and all(not torch.allclose(a[k], b[k]) for k in a)
    assert len(list(cache.glob("text-*.safetensors"))) == 1  # the captions are the same: that cache is shared


def test_deepspeed_and_unsynchronised_processes_are_refused(tiny_flux, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched as two processes that never joined a process group
    code, stderr = run_main("train_lora.py", train_args(tiny_flux, tmp_path / "o", "--max_train_steps", "1"), capsys)
    assert code == 2 and "not synchronised" in stderr.strip().splitlines()[-1]
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ddiff_core.config import ConfigError
    from ddiff_core.trainer import _check_topology

    with pytest.raises(ConfigError, match="DeepSpeed is not supported"):
        _check_topology(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2), None)


def test_the_non_finite_weight_guard_writes_no_checkpoint(tmp_path):
    from ddiff_core.runs import RunIdentity

    class Acc:
        is_main_process, num_processes, process_index = True, 1, 0

    checkpointer = Checkpointer(Acc(), tmp_path, RunIdentity({"x": 1}))
    weights = torch.nn.Parameter(torch.tensor([1.0, float("nan")]))
    with pytest.raises(CheckpointError, match="not finite"):
        checkpointer.save(3, model=None, optimizer=None, lr_scheduler=None, training_generator=torch.Generator(),
                          seed=0, lora_params=[weights])
    assert not list(tmp_path.iterdir())


def test_fp16_keeps_a_force_upcast_vae_in_fp32(tmp_path):
    from ddiff_core.families import get_family
    from ddiff_core.tiny import save_tiny_pipeline

    path = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    components = get_family("sdxl").load_components(str(path), dtype=torch.float16)
    assert components["vae"].config.force_upcast
    assert components["vae"].dtype == torch.float32 and components["unet"].dtype == torch.float16


def test_sdxl_is_conditioned_on_each_images_real_size_and_crop(tmp_path):
    from ddiff_core.data import ImageCaptionDataset, Record, collate, screen_records
    from ddiff_core.families import get_family

    Image.new("RGB", (120, 80), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (64, 200), "blue").save(tmp_path / "tall.png")
    records, _ = screen_records([Record("wide.png", "a", tmp_path / "wide.png"), Record("tall.png", "b", tmp_path / "tall.png")])
    dataset = ImageCaptionDataset(records, resolution=64, seed=0, with_pixels=False)  # random crops, no flips
    batch = collate([dataset[0], dataset[1]])
    assert batch["conditioning"]["original_size"].tolist() == [[80, 120], [200, 64]]
    crops = batch["conditioning"]["crop_top_left"].tolist()
    assert crops[0][0] == 0 and 0 <= crops[0][1] <= 96 - 64 and crops[1][1] == 0 and 0 <= crops[1][0] <= 200 - 64
    assert crops != [[0, 0], [0, 0]]  # random crops, not the origin
    # the pixels are cut at exactly those coordinates
    source = np.asarray(Image.open(tmp_path / "wide.png").resize((96, 64), Image.Resampling.BILINEAR), np.float32)
    top, left = crops[0]
    expected = torch.from_numpy(source[top:top + 64, left:left + 64] / 127.5 - 1.0).permute(2, 0, 1)
    assert torch.equal(dataset.pixels(0), expected)

    family = get_family("sdxl")
    latents = torch.zeros(2, 4, 8, 8)
    embeds = {"pooled_prompt_embeds": torch.zeros(2, 32)}
    time_ids = family.added_conditioning(embeds, latents, batch["conditioning"], 8)["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[80, 120, *crops[0], 64, 64], [200, 64, *crops[1], 64, 64]]


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / MANIFEST).write_text('{"format": 2, "files": "x"}'), "ddiff_checkpoint.json is corrupt"),
    (lambda c: (c / MANIFEST).write_text("[" * 100_000), "ddiff_checkpoint.json is corrupt"),
    (lambda c: _edit_manifest(c, lambda m: m["files"].update({"../../etc/passwd": m["files"]["lora.safetensors"]})),
     "is not allowed"),
    (lambda c: _edit_manifest(c, lambda m: m.update(global_step=7)), "does not fit the folder"),
    (lambda c: _edit_manifest(c, lambda m: m["files"].pop("rng-0.safetensors")), "is missing rng-0.safetensors"),
    (lambda c: _edit_manifest(c, lambda m: m.update(num_processes=2)), "is missing rng-1.safetensors"),
    (lambda c: _symlink_file(c, "scheduler.json"), "not a plain file"),
])
def test_a_malformed_checkpoint_is_an_error_naming_what_is_wrong(trained, tmp_path, damage, message):
    from ddiff_core.checkpoint import latest_checkpoint, verify_checkpoint

    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(trained / "checkpoint-2", checkpoint)
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(checkpoint)
    assert latest_checkpoint(tmp_path) is None  # passed over, not a crash


def _edit_manifest(checkpoint, edit):
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    edit(manifest)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def _symlink_file(checkpoint, name):
    """The file moved outside and linked back in: the manifest still matches its bytes."""
    outside = checkpoint.parent / f"outside-{name}"
    (checkpoint / name).rename(outside)
    (checkpoint / name).symlink_to(outside)


def test_a_symlinked_checkpoint_folder_is_not_a_checkpoint(trained, tmp_path):
    from ddiff_core.checkpoint import latest_checkpoint, list_checkpoints

    (tmp_path / "checkpoint-4").symlink_to(trained / "checkpoint-4")
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None


def test_outputs_keep_the_usual_file_mode(trained):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for name in ("pytorch_lora_weights.safetensors", "README.md", "run.json", "metrics.jsonl"):
        assert stat.S_IMODE((trained / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_flipped_crop_is_reported_where_it_lies_in_the_flipped_image(tmp_path):
    from ddiff_core.data import ImageCaptionDataset, Record, screen_records

    gradient = np.tile(np.arange(120, dtype=np.uint8)[None, :, None] * 2, (80, 1, 3))
    Image.fromarray(gradient).save(tmp_path / "wide.png")
    records, _ = screen_records([Record("wide.png", "a", tmp_path / "wide.png")])
    for seed in range(20):  # some seed flips it
        dataset = ImageCaptionDataset(records, resolution=64, seed=seed, random_flip=True, with_pixels=False)
        if dataset.crop(0).flip:
            break
    crop = dataset.crop(0)
    assert crop.flip
    (_, _), (top, left) = dataset.geometry(0)
    resized = np.asarray(Image.open(tmp_path / "wide.png").resize(crop.resized, Image.Resampling.BILINEAR), np.float32)
    flipped = resized[:, ::-1]
    expected = torch.from_numpy(flipped[top:top + 64, left:left + 64] / 127.5 - 1.0).permute(2, 0, 1)
    assert torch.equal(dataset.pixels(0), expected)
