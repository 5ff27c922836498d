"""MkDocs hook: lay out the ``divo`` package as it installs, for the API reference.

pyproject.toml installs the top-level folders ``agents/``, ``behavior_models/``,
``objectives/`` and ``recipes/`` as ``divo.agents`` etc. (``package-dir``). mkdocstrings reads
sources statically (griffe), and griffe looks for ``divo.agents`` in ``divo/agents/``, which
does not exist. Before each build this hook writes ``build/api-src/divo/``: links to every entry
of ``divo/`` and to the four mapped folders under their installed names; ``mkdocs.yml`` points
mkdocstrings there (``paths``).
"""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TREE = ROOT / "build" / "api-src"


def lay_out_package(root: Path = ROOT, tree: Path = TREE) -> Path:
    """Write ``tree/divo`` as the installed package looks; returns ``tree``."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]  # "divo.agents" -> "agents", ...
    if tree.exists():
        shutil.rmtree(tree)
    package = tree / "divo"
    package.mkdir(parents=True)
    for entry in (root / mapping["divo"]).iterdir():
        os.symlink(entry, package / entry.name)
    for name, folder in mapping.items():
        parts = name.split(".")
        source = root / folder
        if len(parts) == 2 and source != root / parts[0] / parts[1]:
            os.symlink(source, package / parts[1], target_is_directory=True)
    return tree


def on_startup(command: str, dirty: bool) -> None:  # noqa: ARG001 - MkDocs' hook signature
    lay_out_package()
