"""A lazy plugin registry: name -> "module:attribute", built-ins plus a Python entry-point group.

Used by model families and captioners. Nothing is imported until a name is asked for; a name registered twice
is an error, not a silent override.
"""

from __future__ import annotations

import importlib
from functools import cached_property
from importlib.metadata import entry_points


class Registry:
    def __init__(self, kind: str, group: str, builtins: dict[str, str]):
        self.kind, self.group, self.builtins = kind, group, dict(builtins)
        self._instances: dict[str, object] = {}

    @cached_property
    def paths(self) -> dict[str, str]:
        paths = dict(self.builtins)
        for ep in entry_points(group=self.group):
            if ep.name in paths:
                raise ValueError(f"{self.kind} {ep.name!r} is registered twice ({paths[ep.name]} and {ep.value})")
            paths[ep.name] = ep.value
        return paths

    def names(self) -> list[str]:
        return sorted(self.paths)

    def load(self, name: str):
        """The registered class (or factory) for ``name``.

        Raises:
            ValueError: ``name`` is not registered.
        """
        if name not in self.paths:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        module_name, _, attr = self.paths[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def instance(self, name: str):
        """One shared instance of ``name``'s class, created on first use."""
        if name not in self._instances:
            self._instances[name] = self.load(name)()
        return self._instances[name]
