"""AdapterBank: one set of base weights, each LoRA folder loaded once as a named adapter, switched per request.

The LoRA list is read once and cached; it is read again only when the LoRA folder changes. A folder that cannot be
loaded is listed as unavailable with its reason and never stops the server; a LoRA whose file changed is loaded again.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ddiff_core.lora import LORA_WEIGHTS_NAME

logger = logging.getLogger(__name__)
MAX_LORA_BYTES = 4 << 30  # a FLUX LoRA at rank 128 is ~1.2 GB; anything larger is not a LoRA to serve


def adapter_name(folder: str) -> str:
    """A valid, unique adapter name for any folder name: PEFT refuses dots, and an adapter becomes a module attribute,
    so names such as 'train' or 'forward' would clash; a prefix and a digest of the name avoid both."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", folder)[:48]
    return f"lora_{safe}_{hashlib.sha256(folder.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class LoraInfo:
    name: str  # the folder's name: what the page shows and a request names
    path: Path
    trigger: str | None
    stamp: tuple = ()  # (size, mtime) of the weights file: a change means a retrained LoRA
    error: str | None = None  # why it cannot be served, or None
    weight_name: str = LORA_WEIGHTS_NAME  # the weights file in the folder (the EMA copy for an evaluation of it)
    max_sequence_length: int | None = None  # the text length it was trained at (training_config.yaml), if known

    @property
    def adapter(self) -> str:
        return adapter_name(self.name)


def _card_trigger(card: Path) -> str | None:
    if not card.is_file() or card.is_symlink() or card.stat().st_size > 1 << 20:
        return None
    match = re.search(r"^instance_prompt:\s*\"?([^\"\n]+?)\"?\s*$", card.read_text(errors="replace"), re.MULTILINE)
    return None if not match or match.group(1) == "null" else match.group(1)


def _trained_length(config: Path) -> int | None:
    """The T5 length a ddiff run trained at, from its training_config.yaml: a plain file of at most 1 MiB, parsed
    without aliases; None when absent or not a length (a received folder's file is never trusted further)."""
    from ddiff_core.checkpoint import regular_file
    from ddiff_core.config import MAX_CONFIG_BYTES, ConfigError, load_yaml_mapping

    if not regular_file(config, MAX_CONFIG_BYTES):
        return None
    try:
        length = load_yaml_mapping(config.read_text(errors="replace"), config.name).get("max_sequence_length")
    except ConfigError:
        return None
    return length if type(length) is int and 1 <= length <= 512 else None


def _problem(folder: Path, root: Path, weight_name: str = LORA_WEIGHTS_NAME) -> str | None:
    """Why a LoRA folder cannot be served (checked before diffusers sees it), or None."""
    weights = folder / weight_name
    if folder.is_symlink() or weights.is_symlink():
        return "a symlink (only plain folders and files are served)"
    size = weights.stat().st_size
    if size > MAX_LORA_BYTES:
        return f"{weight_name} is {size / 2**30:.1f} GiB, over the {MAX_LORA_BYTES / 2**30:.0f} GiB limit"
    try:
        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                return f"{weight_name} holds no tensors"
    except Exception as err:  # whatever the file is, the server goes on
        return f"{weight_name} is not a readable safetensors file ({_scrub(str(err), root)})"
    return None


def _scrub(message: str, root: Path) -> str:
    """One line without the server's absolute paths."""
    message = message.splitlines()[0] if message else ""
    for path in {str(root.resolve()), str(root)}:
        message = message.replace(path, "<lora_dir>")
    return re.sub(r"(/[^\s'\"]+)+", "<path>", message)[:200]


def lora_info(folder: Path, root: Path, weight_name: str = LORA_WEIGHTS_NAME) -> LoraInfo:
    """One LoRA folder (holding ``weight_name``, by default ``pytorch_lora_weights.safetensors``), checked, not
    loaded; ``root`` is scrubbed from messages."""
    try:
        return LoraInfo(folder.name, folder, _card_trigger(folder / "README.md"), _file_stamp(folder / weight_name),
                        _problem(folder, root, weight_name), weight_name,
                        _trained_length(folder / "training_config.yaml"))
    except OSError as err:  # unreadable, or removed while listed: shown as unavailable, the rest is served
        return LoraInfo(folder.name, folder, None, (), f"unreadable ({err.strerror})", weight_name)


def scan_lora_dir(lora_dir: Path, weight_name: str = LORA_WEIGHTS_NAME) -> list[LoraInfo]:
    """Sub-folders holding ``weight_name``, sorted by name; each checked, none loaded."""
    lora_dir = Path(lora_dir)
    if not lora_dir.is_dir():
        return []
    found = []
    for folder in sorted(lora_dir.iterdir()):
        try:
            if folder.name.startswith(".") or not folder.is_dir() or not (folder / weight_name).is_file():
                continue
        except OSError:
            continue
        found.append(lora_info(folder, lora_dir, weight_name))
    return found


class StaticCatalog:
    """A fixed list of LoRA folders (what the evaluation reads), with LoraCatalog's interface."""

    def __init__(self, items: list[LoraInfo], lora_dir: Path):
        self.items, self.lora_dir = list(items), Path(lora_dir)

    def list(self) -> list[LoraInfo]:
        return self.items


def _file_stamp(path: Path) -> tuple:
    """What changes when a file is rewritten, in place or by a rename over it."""
    stat = path.stat()
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


class LoraCatalog:
    """The LoRA list, cached; refreshed when the folder's listing changes (its mtime, or a sub-folder's)."""

    def __init__(self, lora_dir: str | Path):
        self.lora_dir = Path(lora_dir)
        self._stamp: tuple | None = None
        self._items: list[LoraInfo] = []
        self.scans = 0

    def _current_stamp(self) -> tuple:
        """The folder, each sub-folder and each weights file: a LoRA copied over in place changes it too."""
        if not self.lora_dir.is_dir():
            return ()
        children = []
        for child in sorted(self.lora_dir.iterdir()):
            try:
                weights = child / LORA_WEIGHTS_NAME
                children.append((child.name, child.stat().st_mtime_ns, _file_stamp(weights) if weights.is_file() else ()))
            except OSError:
                children.append((child.name, None, ()))
        return (self.lora_dir.stat().st_mtime_ns, tuple(children))

    def list(self) -> list[LoraInfo]:
        stamp = self._current_stamp()
        if stamp != self._stamp:
            self._items, self._stamp = scan_lora_dir(self.lora_dir), stamp
            self.scans += 1
        return self._items

    def get(self, name: str) -> LoraInfo:
        """A LoRA by name from the listed set; anything else (paths, ``..``, URLs) is a KeyError."""
        for item in self.list():
            if item.name == name:
                return item
        raise KeyError(f"unknown LoRA {name!r}")


class AdapterBank:
    """One pipeline; every servable LoRA of a catalog loaded once as a named adapter; ``select`` switches."""

    def __init__(self, pipeline, catalog: LoraCatalog):
        self.pipeline, self.catalog = pipeline, catalog
        self.loaded: dict[str, LoraInfo] = {}
        self._failed: dict[str, tuple[tuple, str]] = {}  # name -> (file stamp, reason)
        self.lock = threading.RLock()  # adapters and their selection are pipeline-wide state
        self.sync()

    def sync(self) -> None:
        """Brings the adapters in line with the folder: loads new LoRAs, reloads changed ones, drops removed ones.
        Only safetensors is ever read (never pickle); a LoRA that fails is listed as unavailable and logged, and is
        tried again only once its file changes."""
        with self.lock:  # never while another thread generates
            self._sync()

    def _sync(self) -> None:
        items = {item.name: item for item in self.catalog.list()}
        for name, info in list(self.loaded.items()):
            if name not in items or items[name].stamp != info.stamp:
                self.pipeline.delete_adapters(info.adapter)
                del self.loaded[name]
        self._failed = {name: failed for name, failed in self._failed.items()
                        if name in items and items[name].stamp == failed[0]}
        for name, item in items.items():
            if name in self.loaded or name in self._failed:
                continue
            reason = item.error or self._load(item)
            if reason is None:
                self.loaded[name] = item
            else:
                logger.warning("LoRA %s is unavailable: %s", name, reason)
                self._failed[name] = (item.stamp, reason)

    @property
    def unavailable(self) -> dict[str, str]:
        """name -> why it is not served (shown on the page; no server paths)."""
        return {name: reason for name, (_, reason) in self._failed.items()}

    def snapshot(self) -> tuple[list[str], dict[str, str]]:
        """(servable names, unavailable names with reasons), refreshed from the folder unless a generation holds the
        pipeline, in which case the last state is returned at once: a page load never waits for an image."""
        if self.lock.acquire(blocking=False):
            try:
                self._sync()
            finally:
                self.lock.release()
        return sorted(self.loaded), self.unavailable

    def _load(self, item: LoraInfo) -> str | None:
        try:
            self.pipeline.load_lora_weights(str(item.path), weight_name=item.weight_name, adapter_name=item.adapter,
                                            use_safetensors=True)
            return None
        except Exception as err:  # a LoRA for another model, a broken file: the server goes on
            try:
                self.pipeline.delete_adapters(item.adapter)  # whatever part of it was added
            except Exception:
                pass
            return f"does not load into this model ({type(err).__name__}: {_scrub(str(err), self.catalog.lora_dir)})"

    def select(self, name: str | None) -> None:
        """Activates adapter ``name``; ``None`` is the base model (LoRA disabled, nothing unloaded).

        Raises:
            KeyError: ``name`` is not a loaded LoRA.
        """
        if name is None:
            self.pipeline.disable_lora()
            return
        if name not in self.loaded:
            self.sync()
        if name not in self.loaded:
            raise KeyError(f"unknown LoRA {name!r}")
        self.pipeline.enable_lora()
        self.pipeline.set_adapters(self.loaded[name].adapter)
