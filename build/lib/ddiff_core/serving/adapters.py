"""AdapterBank: one set of base weights, each LoRA folder loaded once as a named adapter, switched per request.

The LoRA list is read once and cached; it is read again only when the LoRA folder changes.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ddiff_core.lora import LORA_WEIGHTS_NAME

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class LoraInfo:
    name: str
    path: Path
    trigger: str | None


def _card_trigger(card: Path) -> str | None:
    if not card.is_file():
        return None
    match = re.search(r"^instance_prompt:\s*\"?([^\"\n]+?)\"?\s*$", card.read_text(), re.MULTILINE)
    return None if not match or match.group(1) == "null" else match.group(1)


def scan_lora_dir(lora_dir: Path) -> list[LoraInfo]:
    """Sub-folders holding ``pytorch_lora_weights.safetensors``, sorted by name; names are plain folder names."""
    lora_dir = Path(lora_dir)
    if not lora_dir.is_dir():
        return []
    return [
        LoraInfo(p.name, p, _card_trigger(p / "README.md"))
        for p in sorted(lora_dir.iterdir())
        if p.is_dir() and _NAME.match(p.name) and (p / LORA_WEIGHTS_NAME).is_file()
    ]


class LoraCatalog:
    """The LoRA list, cached; refreshed when the folder's listing changes (its mtime, or a sub-folder's)."""

    def __init__(self, lora_dir: str | Path):
        self.lora_dir = Path(lora_dir)
        self._stamp: tuple | None = None
        self._items: list[LoraInfo] = []
        self.scans = 0

    def _current_stamp(self) -> tuple:
        if not self.lora_dir.is_dir():
            return ()
        children = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in self.lora_dir.iterdir() if p.is_dir()))
        return (self.lora_dir.stat().st_mtime_ns, children)

    def list(self) -> list[LoraInfo]:
        stamp = self._current_stamp()
        if stamp != self._stamp:
            self._items, self._stamp = scan_lora_dir(self.lora_dir), stamp
            self.scans += 1
        return self._items

    def get(self, name: str) -> LoraInfo:
        """A LoRA by name from the loaded set; anything else (paths, ``..``, URLs) is a KeyError."""
        for item in self.list():
            if item.name == name:
                return item
        raise KeyError(f"unknown LoRA {name!r}")


class AdapterBank:
    """One pipeline; every LoRA of a catalog loaded once as a named adapter; ``select`` switches per request."""

    def __init__(self, pipeline, catalog: LoraCatalog):
        self.pipeline, self.catalog = pipeline, catalog
        self.loaded: dict[str, LoraInfo] = {}
        self.lock = threading.Lock()  # adapter selection is pipeline-wide state
        self.sync()

    def sync(self) -> None:
        """Loads adapters for LoRAs that appeared since the last call (safetensors only, never pickle)."""
        for item in self.catalog.list():
            if item.name not in self.loaded:
                self.pipeline.load_lora_weights(str(item.path), weight_name=LORA_WEIGHTS_NAME, adapter_name=item.name,
                                                use_safetensors=True)
                self.loaded[item.name] = item

    def select(self, name: str | None) -> None:
        """Activates adapter ``name``; ``None`` is the base model (LoRA disabled, nothing unloaded)."""
        if name is None:
            self.pipeline.disable_lora()
            return
        if name not in self.loaded:
            self.sync()
        if name not in self.loaded:
            raise KeyError(f"unknown LoRA {name!r}")
        self.pipeline.enable_lora()
        self.pipeline.set_adapters(name)
