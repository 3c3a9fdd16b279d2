"""Checkpoints that cannot be half-written: written to a temporary folder, committed by rename, verified on load.

A checkpoint is accelerate's ``save_state`` (optimizer, LR scheduler, RNG states) with the LoRA weights in place
of the full model, each process's training-stream generator, and a manifest of every file's size and SHA-256.
Only a folder holding a manifest that matches its files counts as a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ddiff_core.lora import lora_state_dict

logger = logging.getLogger(__name__)

MANIFEST = "ddiff_checkpoint.json"
LORA_FILE = "lora.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing a file or is corrupt; the message names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path: Path) -> dict:
    """Returns the manifest of a complete checkpoint.

    Raises:
        CheckpointError: no manifest, or a listed file missing, truncated or changed.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {manifest_path.name} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({err})") from err
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != expected["size"] or _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (size or checksum differs from {MANIFEST})")
    return manifest


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Committed checkpoint folders (by name), oldest first."""
    if not Path(output_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete or corrupt ones are passed over with a warning."""
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as err:
            logger.warning("passing over %s", err)
    return None


class Checkpointer:
    """Saves and restores the whole training state through an Accelerator."""

    def __init__(self, accelerator, output_dir: Path, *, total_limit: int | None = None):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit
        # The model's weights go into checkpoints as the LoRA alone, never the frozen base.
        accelerator.register_save_state_pre_hook(self._save_lora_hook)
        accelerator.register_load_state_pre_hook(self._load_lora_hook)

    def _save_lora_hook(self, models, weights, output_dir):
        for model in models:
            state = lora_state_dict(self.accelerator.unwrap_model(model))
            if self.accelerator.is_main_process:
                save_file(state, os.path.join(output_dir, LORA_FILE))
        weights.clear()

    def _load_lora_hook(self, models, input_dir):
        state = load_file(os.path.join(input_dir, LORA_FILE))
        for model in models:
            result = set_peft_model_state_dict(self.accelerator.unwrap_model(model), state)
            if getattr(result, "unexpected_keys", None):
                raise CheckpointError(f"{input_dir}/{LORA_FILE} does not fit this model: {result.unexpected_keys[:3]}")
        models.clear()

    def save(self, global_step: int, rng_state: dict, lora_params) -> Path:
        """Writes ``checkpoint-<global_step>`` atomically; prunes older ones only after it is committed.

        Raises:
            CheckpointError: the LoRA holds non-finite values (never written).
        """
        acc = self.accelerator
        if not all(torch.isfinite(p).all() for p in lora_params):
            raise CheckpointError(f"refusing to write checkpoint-{global_step}: the LoRA weights are not finite")
        final = self.output_dir / f"checkpoint-{global_step}"
        tmp = self.output_dir / f".checkpoint-{global_step}.tmp"
        if acc.is_main_process:
            for stale in self.output_dir.glob(".checkpoint-*.tmp"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        torch.save(rng_state, tmp / f"training_rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            files = {}
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
                files[str(file.relative_to(tmp))] = {"size": file.stat().st_size, "sha256": _sha256(file)}
            manifest = {"global_step": global_step, "num_processes": acc.num_processes, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.output_dir)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        if not self.total_limit:
            return
        committed = list_checkpoints(self.output_dir)
        for _, path in committed[: max(0, len(committed) - self.total_limit)]:
            logger.info("removing old checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path) -> tuple[int, dict]:
        """Restores the state saved at ``path``; returns (global_step, this process's training-stream state)."""
        manifest = verify_checkpoint(path)
        if manifest.get("num_processes") != self.accelerator.num_processes:
            raise CheckpointError(
                f"checkpoint {path} was written by {manifest.get('num_processes')} processes; this run has "
                f"{self.accelerator.num_processes}"
            )
        self.accelerator.load_state(str(path))
        rng_file = Path(path) / f"training_rng_{self.accelerator.process_index}.pt"
        return int(manifest["global_step"]), torch.load(rng_file, weights_only=False)
