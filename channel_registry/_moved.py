"""The flat module paths that moved into packages still import, with a ``DeprecationWarning``.

The old files are gone rather than left behind as re-exporting stubs: an old
path is an alias of the new module (the same object, so patching either name
patches both), served by a finder on ``sys.meta_path``. ``channel_registry.delivery``
and ``channel_registry.history`` are packages now; their ``__init__`` forwards
the old modules' names the same way (:func:`forward`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

REMOVED_IN = "0.3"  # one release after the move, like every deprecation here

MOVED = {
    "channel_registry.store": "channel_registry.registry.store",
    "channel_registry.postgres": "channel_registry.registry.postgres",
    "channel_registry.liveness": "channel_registry.registry.liveness",
    "channel_registry.sessions": "channel_registry.registry.sessions",
    "channel_registry.slots": "channel_registry.registry.slots",
    "channel_registry.strategy": "channel_registry.delivery.strategy",
    "channel_registry.mapping": "channel_registry.delivery.mapping",
    "channel_registry.pipeline": "channel_registry.delivery.pipeline",
    "channel_registry.budget": "channel_registry.delivery.budget",
    "channel_registry.cursor": "channel_registry.history.cursor",
    "channel_registry.redis_layer": "channel_registry.redis.layer",
}


def warn_moved(old: str, new: str) -> None:
    # Frames of importlib's bootstrap are skipped, so the warning points at the importing line.
    warnings.warn(
        f"{old} moved to {new}; the old path will be removed in {REMOVED_IN}.", DeprecationWarning, stacklevel=3
    )


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        warn_moved(spec.name, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """The new module ran when it was imported; an alias runs nothing."""


class MovedModules(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        new = MOVED.get(fullname)
        return importlib.util.spec_from_loader(fullname, _Alias(new)) if new else None


def install() -> None:
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())


def forward(package: str, old_module: str, new_module: str) -> Callable[[str], Any]:
    """A package's ``__getattr__`` that finds a name of the module the package replaced, with a warning."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__") or not hasattr(module := importlib.import_module(new_module), name):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(module, name)
        warn_moved(f"{old_module}.{name}", f"{new_module}.{name}")
        return value

    return __getattr__
