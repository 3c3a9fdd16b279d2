"""Captioners as plugins (name -> "module:Class", entry-point group "ddiff.captioners")."""

from ddiff_core.captioning.base import Captioner
from ddiff_core.registry import Registry

ENTRY_POINT_GROUP = "ddiff.captioners"
BUILTIN_CAPTIONERS = {
    "qwen2.5-vl": "ddiff_core.captioning.vlm:VisionLanguageCaptioner",
    "template": "ddiff_core.captioning.template:TemplateCaptioner",
}
REGISTRY = Registry("captioner", ENTRY_POINT_GROUP, BUILTIN_CAPTIONERS)

__all__ = ["BUILTIN_CAPTIONERS", "Captioner", "ENTRY_POINT_GROUP", "REGISTRY"]
