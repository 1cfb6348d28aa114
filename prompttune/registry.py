"""Name -> builder registries for methods, backbones, datasets, tasks and zoo entries.

Things register where they are defined (``@METHODS.register("coop")``), as timm's
``@register_model`` does; a duplicate name is an error. :func:`load_all` imports every
module of the component packages once, so a new file under ``prompttune/methods/`` is
picked up without editing any list.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj):
            if name in self._items and self._items[name] is not obj:
                raise RegistryError(f"duplicate {self.kind} name {name!r}: already registered by {self._items[name]!r}")
            self._items[name] = obj
            obj.registry_name = name
            return obj

        return deco

    def get(self, name: str) -> Any:
        load_all()
        if name not in self._items:
            raise RegistryError(f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        load_all()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        load_all()
        return name in self._items


METHODS = Registry("method")
BACKBONES = Registry("backbone")
DATASETS = Registry("dataset")
TASKS = Registry("task")
ZOO = Registry("zoo entry")
SYNTHETIC = Registry("synthetic dataset writer")

_PACKAGES = ("backbones", "zoo", "methods", "tasks", "data")
_loaded = False


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg in _PACKAGES:
        mod = importlib.import_module(f"prompttune.{pkg}")
        for info in pkgutil.iter_modules(mod.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"prompttune.{pkg}.{info.name}")
