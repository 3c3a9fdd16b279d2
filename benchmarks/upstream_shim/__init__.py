"""A stand-in for the torchvision names diffusers' example training scripts use, seen by one script alone.

Where the real torchvision does not import (on ddiff's CPU machine the registry's build needs CUDA torch),
``install(script)`` makes that script's own ``import torchvision...`` statements get ``upstream_shim.torchvision``
(PIL and torch, see README.md). Every other importer, transformers' and diffusers' availability checks included,
still finds no torchvision, so their code paths are the ones they take without it.
"""

from __future__ import annotations

import builtins
import importlib
import os

_SHIM = __name__ + ".torchvision"


def install(script: str) -> None:
    """Serves the shim to imports made by the code of ``script`` (its module globals' ``__file__``) only."""
    target = os.path.realpath(script)
    original = builtins.__import__

    def shimmed_import(name, globals=None, locals=None, fromlist=(), level=0):
        if (level == 0 and (name == "torchvision" or name.startswith("torchvision."))
                and globals and globals.get("__file__") and os.path.realpath(globals["__file__"]) == target):
            module = importlib.import_module(_SHIM + name[len("torchvision"):])
            return module if fromlist else importlib.import_module(_SHIM)
        return original(name, globals, locals, fromlist, level)

    builtins.__import__ = shimmed_import
