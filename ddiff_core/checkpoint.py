"""Checkpoints that cannot be half-written and never run code: safetensors and JSON only, committed by rename.

A checkpoint folder holds the LoRA, the optimizer and LR-scheduler state, every process's RNG states, and a manifest
(``ddiff_checkpoint.json``) with the step, the run's identity and every file's size and SHA-256. Nothing in it is
unpickled: a checkpoint may come from someone else. Only a folder whose manifest matches its files counts, and only
checkpoints of this run (same fingerprint) are resumed or pruned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import torch
from peft.utils import set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ddiff_core.atomic import atomic_write, atomic_write_text, fsync_dir
from ddiff_core.lora import lora_state_dict

logger = logging.getLogger(__name__)

MANIFEST = "ddiff_checkpoint.json"
FORMAT = 2  # 1 was accelerate's save_state (pickles); never loaded
LORA_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
EMA_FILE = "ema.safetensors"  # with --use_ema: the moving average, keyed by parameter name
_NAME = re.compile(r"^checkpoint-(\d+)$")
_STATE_KEY = "ddiff_state"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or from another run; the message names the file or setting."""


# -- state as tensors + JSON ---------------------------------------------------------------------
def _split(obj, tensors: dict, where: str, seen: dict | None = None):
    """A nested state (dicts, lists, tuples, tensors, numbers, strings) -> JSON skeleton; tensors collected aside.
    A tensor met twice (8-bit Adam shares one code book between parameters) is stored once and referenced twice;
    every stored tensor is a copy, so none shares memory with another (safetensors refuses that)."""
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return {"__tensor__": seen[id(obj)]}
        key = seen[id(obj)] = str(len(tensors))
        local = obj.to_local() if hasattr(obj, "to_local") else obj  # a DTensor shard (FSDP): this process's part
        tensors[key] = local.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, tensors, where, seen), _split(v, tensors, f"{where}.{k}", seen)]
                             for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, tensors, f"{where}[{i}]", seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, tensors, f"{where}[{i}]", seen) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray) and obj.dtype == np.uint32:  # NumPy's RNG key; the only array stored
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(obj.astype(np.int64))
        return {"__uint32__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {where} in a checkpoint (tensors, numbers, strings only)")


def _join(node, tensors: dict):
    if isinstance(node, list):
        return [_join(v, tensors) for v in node]
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__dict__" in node:
            return {_join(k, tensors): _join(v, tensors) for k, v in node["__dict__"]}
        if "__tuple__" in node:
            return tuple(_join(v, tensors) for v in node["__tuple__"])
        if "__uint32__" in node:
            return tensors[node["__uint32__"]].numpy().astype(np.uint32)
        raise ValueError(f"unknown node {sorted(node)[:3]}")
    return node


def save_state(path: Path, state) -> Path:
    """Writes any nested state as one safetensors file: the tensors, and the structure as JSON in its header."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_split(state, tensors, path.stem))
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={_STATE_KEY: skeleton}))


def load_state(path: Path):
    """Reads a file written by :func:`save_state`; never unpickles.

    Raises:
        CheckpointError: the file is missing or not such a file.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            skeleton = json.loads((f.metadata() or {})[_STATE_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return _join(skeleton, tensors)
    except (OSError, SafetensorError, KeyError, ValueError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{path} is not a ddiff state file ({type(err).__name__}: {str(err)[:120]})") from err


def _rng_state(training_generator: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "training": training_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, training_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    training_generator.set_state(state["training"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- finding checkpoints -----------------------------------------------------------------------------
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # the format is flat: no folders, no traversal
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_MANIFEST_BYTES = 1 << 20


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def regular_file(path: Path, max_bytes: int | None = None) -> bool:
    """A plain file (not a symlink, FIFO or device), of at most ``max_bytes`` when given: what a checkpoint or an
    output folder from someone else may hold, so that reading it cannot point elsewhere or run on without end."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and (max_bytes is None or info.st_size <= max_bytes)


def _valid_manifest(manifest, folder_step: int | None) -> str | None:
    """What is wrong with a parsed manifest's structure, or None."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "'files' is not a mapping of file names"
    for name, entry in files.items():
        if not (isinstance(name, str) and _FILE_NAME.match(name) and name != MANIFEST):
            return f"file name {str(name)[:40]!r} is not allowed"
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
            return f"the entry for {name} needs an integer size and a sha256"
    for key in ("global_step", "num_processes", "seed"):
        if not isinstance(manifest.get(key), int) or isinstance(manifest.get(key), bool) or manifest[key] < 0:
            return f"'{key}' is not a non-negative integer"
    if manifest["num_processes"] < 1 or (folder_step is not None and manifest["global_step"] != folder_step):
        return "its step or process count does not fit the folder"
    run = manifest.get("run")
    if not (isinstance(run, dict) and isinstance(run.get("fingerprint"), str) and isinstance(run.get("settings"), dict)):
        return "'run' needs a fingerprint and settings"
    return None


def read_manifest(path: Path) -> dict:
    """The manifest of a checkpoint folder, its structure checked but its files not yet verified.

    Raises:
        CheckpointError: the folder or its manifest is missing, a symlink, unreadable, malformed or of an old format.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir() or path.is_symlink():
        raise CheckpointError(f"checkpoint {path} does not exist or is a symlink")
    if not regular_file(manifest_path):
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing")
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(manifest_path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({type(err).__name__})") from err
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is of an older format ({manifest.get('format', 1)}, which held "
                              "pickles) and is not loaded; start the run again")
    match = _NAME.match(path.name)
    problem = _valid_manifest(manifest, int(match.group(1)) if match else None)
    if problem:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({problem})")
    return manifest


def _required_files(manifest: dict) -> list[str]:
    ranks = range(manifest["num_processes"])
    sharded = "optimizer-0.safetensors" in manifest["files"]
    optimizers = [f"optimizer-{r}.safetensors" for r in ranks] if sharded else [OPTIMIZER_FILE]
    ema = [EMA_FILE] if manifest["run"]["settings"].get("use_ema") else []
    return [LORA_FILE, SCHEDULER_FILE, *optimizers, *ema, *(f"rng-{r}.safetensors" for r in ranks)]


def verify_checkpoint(path: Path) -> dict:
    """Returns the manifest of a complete checkpoint whose files all match it (every process's files included, so
    every process of a resumed run fails alike, before any collective).

    Raises:
        CheckpointError: no manifest, or a listed file missing, a symlink, truncated or changed.
    """
    path = Path(path)
    manifest = read_manifest(path)
    for name in _required_files(manifest):
        if name not in manifest["files"]:
            raise CheckpointError(f"checkpoint {path} is missing {name}")
    for name, expected in manifest["files"].items():
        file = path / name
        if not regular_file(file):
            raise CheckpointError(f"checkpoint {path} is missing {name} (or it is not a plain file)")
        try:
            if file.stat().st_size != expected["size"] or file_sha256(file) != expected["sha256"]:
                raise CheckpointError(f"checkpoint {path}: {name} is corrupt (size or checksum differs from {MANIFEST})")
        except OSError as err:
            raise CheckpointError(f"checkpoint {path}: {name} is unreadable ({err.strerror})") from err
    return manifest


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Committed checkpoint folders (by name, symlinks ignored), oldest first."""
    if not Path(output_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir()
             if (m := _NAME.match(p.name)) and p.is_dir() and not p.is_symlink()]
    return sorted(found)


def _fingerprint_of(path: Path) -> str | None:
    try:
        return read_manifest(path)["run"]["fingerprint"]
    except CheckpointError:
        return None


def latest_checkpoint(output_dir: Path, fingerprint: str | None = None) -> Path | None:
    """The newest complete checkpoint of the run ``fingerprint`` (any run when None); incomplete or corrupt
    ones are passed over with a warning, other runs' silently."""
    for _, path in reversed(list_checkpoints(output_dir)):
        found = _fingerprint_of(path)
        if fingerprint is not None and found is not None and found != fingerprint:
            continue
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as err:
            logger.warning("passing over %s", err)
    return None


class Checkpointer:
    """Saves and restores a run's whole training state, in ddiff's own safe format."""

    def __init__(self, accelerator, output_dir: Path, run, *, total_limit: int | None = None):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.run = run  # RunIdentity
        self.total_limit = total_limit

    def save(self, global_step: int, *, model, optimizer, lr_scheduler, training_generator: torch.Generator,
             seed: int, lora_params, ema=None) -> Path:
        """Writes ``checkpoint-<global_step>`` atomically; prunes this run's older ones only after it is committed.

        Raises:
            CheckpointError: the LoRA holds non-finite values (nothing is written).
        """
        acc = self.accelerator
        if not all(torch.isfinite(p).all() for p in lora_params):
            raise CheckpointError(f"refusing to write checkpoint-{global_step}: the LoRA weights are not finite")
        final = self.output_dir / f"checkpoint-{global_step}"
        tmp = self.output_dir / f".checkpoint-{global_step}.tmp"
        lora = lora_state_dict(acc.unwrap_model(model))
        if acc.is_main_process:
            for stale in self.output_dir.glob(".checkpoint-*.tmp"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
            # Data-parallel processes hold identical LoRA, optimizer and scheduler states: one copy is enough.
            atomic_write(tmp / LORA_FILE, lambda p: save_file(lora, str(p)))
            if not _sharded(acc):
                save_state(tmp / OPTIMIZER_FILE, optimizer.state_dict())
            atomic_write_text(tmp / SCHEDULER_FILE, json.dumps(lr_scheduler.state_dict()))
            if ema is not None:
                atomic_write(tmp / EMA_FILE, lambda p: save_file(ema.state_dict(), str(p)))
        acc.wait_for_everyone()
        if _sharded(acc):  # each process holds its own shard of the optimizer state
            save_state(tmp / f"optimizer-{acc.process_index}.safetensors", optimizer.state_dict())
        save_state(tmp / f"rng-{acc.process_index}.safetensors", _rng_state(training_generator))
        acc.wait_for_everyone()
        if acc.is_main_process:
            files = {str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
                     for f in sorted(p for p in tmp.rglob("*") if p.is_file())}
            manifest = {"format": FORMAT, "global_step": global_step, "num_processes": acc.num_processes, "seed": seed,
                        "run": self.run.to_json(), "files": files}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(self.output_dir)
            self._prune(keep=final)
        acc.wait_for_everyone()
        return final

    def _prune(self, keep: Path) -> None:
        if not self.total_limit:
            return
        # Only checkpoints whose manifest names this run count; an unreadable or foreign folder is left alone.
        mine = [p for _, p in list_checkpoints(self.output_dir) if _fingerprint_of(p) == self.run.fingerprint]
        for path in mine[: max(0, len(mine) - self.total_limit)]:
            if path != keep:
                logger.info("removing old checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)

    def check(self, path: Path) -> dict:
        """Verifies that ``path`` is a complete checkpoint of this run (for this many processes, once an
        accelerator is known); returns its manifest.

        Raises:
            CheckpointError: naming the file, or the settings that differ.
        """
        manifest = verify_checkpoint(path)
        theirs = manifest["run"]
        if theirs["fingerprint"] != self.run.fingerprint:
            differences = self.run.differences(theirs["settings"])
            raise CheckpointError(f"checkpoint {path} belongs to another run (differs in "
                                  f"{'; '.join(differences) or 'its fingerprint'})")
        if self.accelerator is not None and manifest["num_processes"] != self.accelerator.num_processes:
            raise CheckpointError(f"checkpoint {path} was written by {manifest['num_processes']} processes; "
                                  f"this run has {self.accelerator.num_processes}")
        return manifest

    def load(self, path: Path, manifest: dict, *, model, optimizer, lr_scheduler,
             training_generator: torch.Generator, ema=None) -> int:
        """Restores the state saved at ``path`` (already checked, ``manifest`` being what :meth:`check` returned);
        returns the global step. Every piece is checked against this run's own state before it is used.

        Raises:
            CheckpointError: naming the file that does not fit.
        """
        path, acc = Path(path), self.accelerator
        if manifest["num_processes"] != acc.num_processes:
            raise CheckpointError(f"checkpoint {path} was written by {manifest['num_processes']} processes; "
                                  f"this run has {acc.num_processes}")
        own_lora = lora_state_dict(acc.unwrap_model(model))
        # No file of a real checkpoint is larger than a few copies of the LoRA: refuse before reading a huge one.
        limit = 4 * sum(t.numel() * t.element_size() for t in own_lora.values()) + (1 << 20)
        for name, entry in manifest["files"].items():
            if entry["size"] > limit:
                raise CheckpointError(f"{path / name} is larger ({entry['size']} bytes) than this run's state can be")
        lora = _load_matching(path / LORA_FILE, {k: v.shape for k, v in own_lora.items()})
        set_peft_model_state_dict(acc.unwrap_model(model), lora)
        if ema is not None:
            ema.load_state_dict(_load_matching(path / EMA_FILE, ema.shapes()))

        sharded = _sharded(acc)
        optimizer_file = path / (f"optimizer-{acc.process_index}.safetensors" if sharded else OPTIMIZER_FILE)
        state = load_state(optimizer_file)
        problem = _optimizer_state_problem(state, optimizer)
        if problem:
            raise CheckpointError(f"{optimizer_file} does not fit this run's optimizer ({problem})")
        load_optimizer_state(optimizer, _as_shards(state, optimizer) if sharded else state)

        try:
            scheduler_state = json.loads((path / SCHEDULER_FILE).read_bytes())
        except (OSError, ValueError, RecursionError) as err:
            raise CheckpointError(f"{path / SCHEDULER_FILE} is not JSON ({type(err).__name__})") from err
        if not _same_shape(scheduler_state, lr_scheduler.state_dict()):
            raise CheckpointError(f"{path / SCHEDULER_FILE} does not fit this run's LR scheduler")
        lr_scheduler.load_state_dict(scheduler_state)

        rng_file = path / f"rng-{acc.process_index}.safetensors"
        try:
            _set_rng_state(load_state(rng_file), training_generator)
        except (ValueError, KeyError, TypeError, IndexError, OverflowError, RuntimeError) as err:
            raise CheckpointError(f"{rng_file}: not a valid RNG state ({type(err).__name__})") from err
        return manifest["global_step"]


def _load_matching(path: Path, shapes: dict) -> dict[str, torch.Tensor]:
    """A safetensors file holding exactly the named tensors of these shapes (checked in its header, before any
    tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if keys != set(shapes):
                missing, extra = sorted(set(shapes) - keys), sorted(keys - set(shapes))
                raise CheckpointError(f"{path} does not fit this model (missing {missing[:2]}, unexpected {extra[:2]})")
            for key in keys:
                if tuple(f.get_slice(key).get_shape()) != tuple(shapes[key]):
                    raise CheckpointError(f"{path} does not fit this model ({key} has another shape)")
            return {key: f.get_tensor(key) for key in keys}
    except (OSError, SafetensorError, ValueError) as err:
        raise CheckpointError(f"{path} is not a safetensors file ({type(err).__name__}: {str(err)[:120]})") from err


def _same_shape(loaded, fresh) -> bool:
    """The same nested structure and JSON types (a number may be an int or a float)."""
    if isinstance(fresh, dict):
        return isinstance(loaded, dict) and loaded.keys() == fresh.keys() and all(
            _same_shape(loaded[k], fresh[k]) for k in fresh)
    if isinstance(fresh, (list, tuple)):
        return isinstance(loaded, (list, tuple)) and len(loaded) == len(fresh) and all(
            _same_shape(a, b) for a, b in zip(loaded, fresh))
    if isinstance(fresh, bool) or fresh is None:
        return type(loaded) is type(fresh)
    if isinstance(fresh, (int, float)):
        return isinstance(loaded, (int, float)) and not isinstance(loaded, bool)
    return type(loaded) is type(fresh)


_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "state1", "state2")


# How an optimizer runs, not what it learnt: a run resumed on another device (or after a change of kernel) takes its
# own values, not the checkpoint's.
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _without_implementation(groups: list) -> list:
    return [{k: v for k, v in g.items() if k not in _IMPLEMENTATION_KEYS} if isinstance(g, dict) else g
            for g in groups]


def _state_tensors(entry: dict, prefix: str = ""):
    """(name, tensor) of one parameter's state, nested dicts (8-bit Adam's quantization state) included."""
    for name, value in entry.items():
        if isinstance(value, dict):
            yield from _state_tensors(value, f"{prefix}{name}.")
        elif isinstance(value, torch.Tensor):
            yield f"{prefix}{name}", value


def _optimizer_state_problem(state, optimizer) -> str | None:
    """Why a loaded optimizer state does not fit ``optimizer`` (param groups, parameter indices, tensor shapes)."""
    fresh = optimizer.state_dict()
    if not (isinstance(state, dict) and state.keys() == fresh.keys() and isinstance(state["state"], dict)
            and isinstance(state["param_groups"], list)):
        return "not an optimizer state"
    groups = state["param_groups"]
    if not _same_shape(_without_implementation(groups), _without_implementation(fresh["param_groups"])) or any(
            g["params"] != f["params"] for g, f in zip(groups, fresh["param_groups"])):
        return "its parameter groups differ"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state["state"].items():
        if not (isinstance(index, int) and 0 <= index < len(params) and isinstance(entry, dict)):
            return f"state for parameter {str(index)[:20]}"
        shape = (params[index].to_local() if hasattr(params[index], "to_local") else params[index]).shape
        for name, value in _state_tensors(entry):
            # Moments have the parameter's shape; 8-bit Adam adds small 1-D tables (a 256-entry code book and one
            # scale per block of 256): anything else does not belong to this parameter.
            small_table = value.ndim == 1 and name.rsplit(".", 1)[-1] not in _MOMENTS
            if small_table and value.numel() <= 256 + shape.numel() // 256 + 1:
                continue
            if value.ndim > 0 and value.shape != shape:
                return f"{name} of parameter {index} has shape {tuple(value.shape)}, not {tuple(shape)}"
    return None


def load_optimizer_state(optimizer, state: dict) -> None:
    """Loads a checked state, keeping this optimizer's own implementation settings (fused, foreach, ...)."""
    own = [{k: g[k] for k in _IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, own):
        for key in _IMPLEMENTATION_KEYS:
            group.pop(key, None)
        group.update(settings)


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def _as_shards(state: dict, optimizer) -> dict:
    """This process's saved optimizer shards back as DTensors laid out like their (sharded) parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state["state"].items():
        param = params[index]
        if isinstance(param, DTensor):
            for name, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    entry[name] = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements)
    return state
