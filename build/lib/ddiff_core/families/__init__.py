"""The model-family registry: name -> dotted path, imported lazily; third parties add families by entry point.

A family is found from a model folder's ``model_index.json`` (its ``_class_name``) or named explicitly.
Importing this module imports no model code.
"""

from __future__ import annotations

import json
from pathlib import Path

from ddiff_core.families.base import ModelFamily
from ddiff_core.registry import Registry

ENTRY_POINT_GROUP = "ddiff.families"

# Built-in families. Values are "module:attribute" so nothing is imported until asked for.
BUILTIN_FAMILIES: dict[str, str] = {
    "flux": "ddiff_core.families.flux:FluxFamily",
    "sd3": "ddiff_core.families.sd3:SD3Family",
    "sd15": "ddiff_core.families.unet:SD15Family",
    "sdxl": "ddiff_core.families.unet:SDXLFamily",
}

__all__ = ["ENTRY_POINT_GROUP", "ModelFamily", "UnknownModelError", "available_families", "get_family", "resolve_family"]


class UnknownModelError(ValueError):
    """The model folder is not a pipeline of any registered family."""


REGISTRY = Registry("model family", ENTRY_POINT_GROUP, BUILTIN_FAMILIES)


def available_families() -> list[str]:
    """Names of every registered family, built-in and from entry points."""
    return REGISTRY.names()


def get_family(name: str) -> ModelFamily:
    """The (shared) instance of the family registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered, or what it names is not a ModelFamily.
    """
    family = REGISTRY.instance(name)
    if not isinstance(family, ModelFamily):
        raise TypeError(f"{REGISTRY.paths[name]} is not a ModelFamily")
    return family


def _model_index_file(model_path: str | Path) -> Path | None:
    local = Path(model_path) / "model_index.json"
    if local.is_file() or Path(model_path).exists():
        return local if local.is_file() else None
    try:  # a hub id: read (or reuse the cached) model_index.json; honours HF_HUB_OFFLINE
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(model_path), "model_index.json"))
    except Exception:
        return None


def resolve_family(model_path: str | Path, family_name: str | None = None) -> ModelFamily:
    """The family for a local model folder: the one named, else the one claiming its pipeline class.

    Raises:
        UnknownModelError: the folder has no ``model_index.json`` or no family claims its pipeline class.
    """
    if family_name:
        return get_family(family_name)
    index_file = _model_index_file(model_path)
    if index_file is None:
        raise UnknownModelError(
            f"{model_path} is not a diffusers pipeline folder (no model_index.json); pass --model_family to name one"
        )
    try:
        class_name = json.loads(index_file.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as err:
        raise UnknownModelError(f"{index_file} is not a valid model_index.json ({err})") from err
    for name in available_families():
        family = get_family(name)
        if class_name in family.pipeline_class_names:
            return family
    raise UnknownModelError(f"{model_path} holds a {class_name}, which no registered model family handles")
