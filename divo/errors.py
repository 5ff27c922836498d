"""User-facing errors.

Every problem caused by input (a recipe, an override, a dataset, a checkpoint) is raised as a
:class:`DivoError` whose message is ONE line naming the problem and the fix. The command line
prints it as ``divo: error: <message>`` and exits with status 2, with no traceback.
"""

from __future__ import annotations


class DivoError(Exception):
    """Base class for errors caused by user input; the message is one line: problem + fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(DivoError):
    """A recipe, override or config value is wrong."""


class ProtocolError(ConfigError, TypeError):
    """A plugged-in part (behaviour model, weighting scheme, target selector) does not follow
    its protocol; raised when the agent is built, before any training."""


class DatasetError(DivoError):
    """A dataset cannot be found, read, or used with this recipe/environment."""


class CheckpointError(DivoError):
    """A checkpoint cannot be read or does not match this run."""


class UntrustedFileError(CheckpointError):
    """A policy file, checkpoint or run config asks for code to run: a pickled object, a
    ``_target_`` outside divo and the modules the user trusts, or an environment entry point
    outside gymnasium, gymnasium-robotics and divo. Refused before anything runs or changes on
    disk; a resumed run never falls back past such a file."""


class RunInUseError(DivoError):
    """Another process holds the run directory (its ``.lock``): two processes writing one run
    would interleave its metrics, logs and checkpoints. Refused before anything changes."""


def type_name(obj: object) -> str:
    """``module.Class`` of ``obj``'s type, to name a user's plugged-in part in an error."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty),
    for one-line errors that wrap another."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def first_few(items: list[str], n: int = 3) -> str:
    """``a; b; c; and N more``: the first ``n`` of ``items``, for one-line errors."""
    more = f"; and {len(items) - n} more" if len(items) > n else ""
    return "; ".join(items[:n]) + more


DISTRIBUTION = "divo-rl"  # the name on the package index; the import name is `divo`


def install_hint(extra: str) -> str:
    """The command that adds the optional dependencies ``extra`` to divo as it is installed
    here: ``pip install -e "<checkout>[extra]"`` for an editable install (or a source tree run
    without installing), ``pip install "<folder>[extra]"`` for one installed from a local
    folder, else ``pip install "divo-rl[extra]"``."""
    import json
    from importlib import metadata
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    found = (d.read_text("direct_url.json") for d in metadata.distributions(name=DISTRIBUTION))
    direct = next((text for text in found if text), None)
    if direct:  # installed from a folder or a URL (PEP 610); an index install has none
        info = json.loads(direct)
        url = urlparse(info.get("url", ""))
        if url.scheme == "file":
            editable = info.get("dir_info", {}).get("editable", False)
            return f'pip install {"-e " if editable else ""}"{unquote(url.path)}[{extra}]"'
    root = Path(__file__).resolve().parents[1]
    if direct is None and (root / "pyproject.toml").is_file():  # a source tree on sys.path
        return f'pip install -e "{root}[{extra}]"'
    return f'pip install "{DISTRIBUTION}[{extra}]"'
