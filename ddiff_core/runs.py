"""One run per output folder: a run's identity (model, data and every setting that changes the maths) and the
rules that keep a fresh run from mixing with an older one's files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ddiff_core.atomic import atomic_write_text
from ddiff_core.caching import fingerprint

RUN_FILE = "run.json"
# How batches are drawn; a new version changes which images meet in a step, so resuming across it is refused.
SAMPLER_VERSION = 2  # 2: one aspect bucket per batch, remainders repeated
# Settings that change what is trained. Not here, because a resume may change them: max_train_steps,
# num_train_epochs, checkpointing, validation, logging, caching (a cache changes no maths), data loader workers.
MATH_SETTINGS = (
    "model_family", "revision", "variant", "dataset_config_name", "image_column", "caption_column", "instance_prompt",
    "repeats", "resolution", "center_crop", "random_flip", "max_sequence_length",
    "rank", "lora_alpha", "lora_dropout", "lora_layers",
    "train_batch_size", "gradient_accumulation_steps", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps",
    "lr_num_cycles", "lr_power", "optimizer", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "max_grad_norm", "mixed_precision", "seed",
    "guidance_scale", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "snr_gamma", "noise_offset",
    "prediction_type",
)
# Settings added later: in a run's identity only when set, so runs from before they existed keep their identity.
LATER_SETTINGS = {"use_ema": False, "base_quantization": "none", "use_8bit_adam": False}
# What a run writes into its folder (the feature cache is keyed by content and may be shared, so it is not here).
RUN_OUTPUTS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "metrics.jsonl",
               "run_summary.json", "training_config.yaml", "skipped_images.txt", "buckets.json",
               "holdout.jsonl", "pytorch_lora_weights_ema.safetensors")
# Names a user may have too: removed only where run.json shows the folder was a ddiff run's.
RUN_OUTPUTS_IF_RUN = ("README.md", "validation")
# Their presence means a folder holds a run's results.
_RESULTS = ("pytorch_lora_weights.safetensors", "metrics.jsonl")


class RunFolderError(ValueError):
    """The output folder holds another run's files, or a checkpoint belongs to another run; one line."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sampled_digest(path: Path, chunk: int = 1 << 16, samples: int = 16) -> str:
    """SHA-256 over a file's size and evenly spaced chunks (the whole file when small): a cheap identity for
    multi-GB weight files that still tells two random models of one architecture apart."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= chunk * samples:
            digest.update(f.read())
        else:
            for i in range(samples):
                f.seek((size - chunk) * i // (samples - 1))
                digest.update(f.read(chunk))
    return digest.hexdigest()


def model_identity(model_path: str, revision: str | None = None, variant: str | None = None) -> str:
    """An identity of a model's weights and configs that survives moving or copying the folder.

    A local folder: every file's name and a (sampled) digest of its content. A hub id: id, revision and variant.
    """
    root = Path(model_path)
    if not root.is_dir():
        return _sha256(json.dumps({"hub": str(model_path), "revision": revision, "variant": variant}).encode())
    files = {str(p.relative_to(root)): _sampled_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}
    return _sha256(json.dumps({"files": files, "variant": variant}, sort_keys=True).encode())


def data_identity(records) -> str:
    """The data's identity: each record's image digest and caption, in order."""
    return _sha256(json.dumps([[r.digest, r.caption] for r in records]).encode())


@dataclass(frozen=True)
class RunIdentity:
    """What makes two runs the same run; ``settings`` is plain JSON (kept in run.json and every checkpoint)."""

    settings: dict

    @classmethod
    def of(cls, config, family: str, model: str, data: str, buckets: list | None = None) -> "RunIdentity":
        """``buckets``: the aspect buckets in use (the resolved list, not the flags that chose it), or None."""
        values = {name: getattr(config, name) for name in MATH_SETTINGS}
        values.update({name: getattr(config, name) for name, unset in LATER_SETTINGS.items()
                       if getattr(config, name, unset) != unset})
        if getattr(config, "use_ema", False):
            values["ema_decay"] = config.ema_decay
        return cls({"family": family, "model": model, "data": data, "sampler": SAMPLER_VERSION,
                    "buckets": [str(b) for b in buckets] if buckets else None, **values})

    @property
    def fingerprint(self) -> str:
        return fingerprint({"run": self.settings})

    def differences(self, other: dict) -> list[str]:
        """'name: theirs -> ours' for each setting that differs (model and data by name only)."""
        out = []
        for key in sorted(set(self.settings) | set(other)):
            mine, theirs = self.settings.get(key), other.get(key)
            if mine != theirs:
                out.append(key if key in ("model", "data") else f"{key}: {theirs!r} -> {mine!r}")
        return out

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "settings": self.settings}


def read_run_file(output_dir: Path) -> dict | None:
    """The settings recorded in ``output_dir/run.json``, or None when absent, unreadable or not a plain file of at
    most 1 MiB (a resumed folder may come from someone else)."""
    from ddiff_core.checkpoint import regular_file

    path = Path(output_dir) / RUN_FILE
    if not regular_file(path, 1 << 20):
        return None
    try:
        settings = json.loads(path.read_bytes())["settings"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return settings if isinstance(settings, dict) else None


def write_run_file(output_dir: Path, identity: RunIdentity) -> None:
    atomic_write_text(Path(output_dir) / RUN_FILE, json.dumps(identity.to_json(), indent=1) + "\n")


def _run_results(output_dir: Path) -> list[str]:
    if not output_dir.is_dir():
        return []
    found = [name for name in _RESULTS if (output_dir / name).exists()]
    return found + sorted(p.name for p in output_dir.glob("checkpoint-*") if p.is_dir())


def check_output_dir(output_dir: str | Path, identity: RunIdentity, *, resume: str | None, overwrite: bool) -> None:
    """Refuses to start a run into a folder holding another run's results, before any model loads.

    A fresh run needs an empty folder (or ``--overwrite_output_dir``); a resume needs the folder's run to be this
    one (same fingerprint in run.json).

    Raises:
        RunFolderError: naming what is there and the settings that differ.
    """
    output_dir = Path(output_dir)
    found = _run_results(output_dir)
    if overwrite or not found:
        return
    listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    if resume is None:
        raise RunFolderError(
            f"--output_dir {output_dir} already holds a run ({listed}): pass --resume_from_checkpoint latest to "
            "continue it, --overwrite_output_dir to replace it, or choose another --output_dir")
    previous = read_run_file(output_dir)
    if previous is None:
        raise RunFolderError(f"--output_dir {output_dir} holds files of a run without {RUN_FILE} ({listed}); "
                             "pass --overwrite_output_dir to replace them or choose another --output_dir")
    differences = identity.differences(previous)
    if differences:
        raise RunFolderError(f"--output_dir {output_dir} holds another run (differs in {'; '.join(differences)}); "
                             "pass --overwrite_output_dir to replace it or choose another --output_dir")


def clear_run_outputs(output_dir: str | Path, logging_dir: str = "logs") -> list[str]:
    """Deletes what an earlier run wrote into ``output_dir`` (its outputs and checkpoints; the feature cache,
    keyed by content, and anything ddiff did not write stay). Returns the names removed."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    targets = [output_dir / name for name in RUN_OUTPUTS]
    if (output_dir / RUN_FILE).is_file():
        targets += [output_dir / name for name in (*RUN_OUTPUTS_IF_RUN, logging_dir, RUN_FILE)]
    targets += list(output_dir.glob("checkpoint-*")) + list(output_dir.glob(".checkpoint-*.tmp"))
    removed = []
    for path in targets:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path.name)
    return sorted(removed)
