"""Old import paths, kept working: modules that moved when the package was arranged one room
per concern (``divo.data``, ``divo.studies``, ``divo.config``, ``divo.files``).

Importing an old path gives the module's new home (or, for a module split in several, a module
that finds each name where it lives now) with a one-line ``FutureWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any

# old module -> its new home (one module) or the modules it was split into
MOVED: dict[str, str | tuple[str, ...]] = {
    "divo.datasets": (
        "divo.data.minari_io",
        "divo.data.paths",
        "divo.data.transitions",
        "divo.data.bandit",
        "divo.data.builtin",
        "divo.data.envs",
    ),
    "divo.agents.data": (
        "divo.data.load",
        "divo.data.checks",
        "divo.data.batches",
        "divo.data.builtin",
    ),
    "divo.envs": "divo.data.envs",
    "divo.envs.bandit": "divo.data.bandit",
    "divo.factory": "divo.data.factory",
    "divo.factory.build": "divo.data.factory.build",
    "divo.factory.cli": "divo.data.factory.cli",
    "divo.factory.pointmaze": "divo.data.factory.pointmaze",
    "divo.factory.rollouts": "divo.data.factory.rollouts",
    "divo.factory.sac": "divo.data.factory.sac",
    "divo.bandit_study": "divo.studies.bandit",
    "divo.diffusion_ql_toy": "divo.studies.diffusion_ql_toy",
    "divo.locomotion_study": "divo.studies.locomotion",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; import it from there", FutureWarning, stacklevel=4)


class _SplitModule(types.ModuleType):
    """An old module split in several: each attribute is looked up in the new modules."""

    def __init__(self, name: str, homes: tuple[str, ...]) -> None:
        super().__init__(name, f"moved: see {', '.join(homes)}")
        self._homes = homes

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for home in self._homes:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(
            f"{self.__name__} (moved to {', '.join(self._homes)}) has no attribute {attr!r}"
        )


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec) -> types.ModuleType:
        home = MOVED[spec.name]
        if isinstance(home, str):
            _warn(spec.name, home)
            return importlib.import_module(home)
        _warn(spec.name, ", ".join(home))
        return _SplitModule(spec.name, home)

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # the module was made whole by create_module


def install() -> None:
    """Put the finder for the old paths in front of the import system (once)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
