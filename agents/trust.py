"""What a file may make divo run: ``_target_``s and environment entry points, by allow-list.

A policy file, a checkpoint or a run's ``config.yaml`` is data. Loading one instantiates the
``_target_``s of its configs and may build the environment its spec names; both import and call
code by name. The names are allowed only from:

- divo itself: ``torch.nn.Module`` classes defined in divo's packages (its networks, behaviour
  models, losses, weightings, selectors and deployable policies);
- modules the user trusts by name when loading (``divo evaluate RUN --trust my_pkg``,
  ``trust=["my_pkg"]`` in Python): classes and functions defined in them or their submodules
  (plugged-in behaviour models, weightings, selectors);
- for environments, also gymnasium, gymnasium-robotics and ogbench (``gymnasium.Env`` and
  wrapper classes), and ids registered with gymnasium in this process under their registered entry
  point.

Anything else is refused with one line (:class:`UntrustedFileError`) before it is imported.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import gymnasium as gym
from gymnasium.envs.registration import EnvSpec
from hydra.utils import get_object
from torch import nn

from divo.errors import CheckpointError, ConfigError, UntrustedFileError, first_line

DIVO = ("divo",)
ENV_PACKAGES = ("gymnasium", "gymnasium_robotics", "ogbench", "divo")
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

Trust = str | Iterable[str] | None


def trusted_modules(trust: Trust) -> tuple[str, ...]:
    """The module names the user trusts (``--trust`` / ``trust=``), checked."""
    names = [trust] if isinstance(trust, str) else list(trust or ())
    for name in names:
        if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
            raise ConfigError(
                f"trust={name!r} is not a module name; name the package that holds your "
                "classes, e.g. --trust my_pkg"
            )
        if _stdlib(name):
            raise ConfigError(
                f"trust={name!r} is a module of Python's standard library, whose functions "
                "run commands and touch files; trust only the package of your own classes, "
                "e.g. --trust my_pkg"
            )
    return tuple(names)


def _stdlib(name: str) -> bool:
    return name.split(".")[0].split(":")[0] in sys.stdlib_module_names


def _under(name: str, modules: Iterable[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _how_to_trust(name: str) -> str:
    """The end of an untrusted-name refusal: how to trust the module, or, for Python's standard
    library (never a plug-in: no divo file names one), not to load the file."""
    root = name.split(".")[0].split(":")[0]
    if _stdlib(name):
        return (
            f"{root} is Python's standard library, which no divo file names: the file was "
            "edited or is not a divo file; do not load it"
        )
    return (
        f"if you trust the file and that module, load it with --trust {root} "
        f"(trust=[{root!r}] in Python)"
    )


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, key, value) of every entry of nested dicts and lists."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list | tuple):
        items = enumerate(node)
    else:
        return
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        yield where, key, value
        yield from _walk(value, where)


def _check_target(target: Any, modules: tuple[str, ...], where: str, path: str) -> None:
    if not isinstance(target, str) or not _MODULE_NAME.fullmatch(target):
        raise UntrustedFileError(
            f"{where} has _target_={target!r} at {path}, which is not a dotted class name; "
            "the file was edited or is not a divo file"
        )
    trusted = _under(target, modules)
    if not trusted and not _under(target, DIVO):
        raise UntrustedFileError(
            f"{where} names _target_={target} (at {path}), outside divo and the modules "
            f"trusted for loading; {_how_to_trust(target)}"
        )
    try:  # imports only divo's modules or the ones the user trusts
        obj = get_object(target)
    except Exception as exc:  # noqa: BLE001 - unimportable names are one user problem
        raise CheckpointError(
            f"{where} names _target_={target} (at {path}), which cannot be imported "
            f"({first_line(exc)}); install the module it needs or use the divo version that "
            "wrote the file"
        ) from None
    defined_in = getattr(obj, "__module__", None) or ""
    if trusted:  # a trusted module's own classes and functions, not what it imports
        ok = callable(obj) and _under(defined_in, (*modules, *DIVO))
    else:  # divo: its torch modules only (no function of divo that writes or deletes files)
        ok = isinstance(obj, type) and issubclass(obj, nn.Module) and _under(defined_in, DIVO)
    if not ok:
        what = f"{type(obj).__name__} from {defined_in or '?'}"
        raise UntrustedFileError(
            f"{where} names _target_={target} (at {path}), a {what}: a file may only name "
            "divo's torch modules or classes of the modules trusted for loading; the file was "
            "edited or is not a divo file"
        )


def check_config(config: Any, trust: Trust, where: str) -> None:
    """Refuse ``config`` (nested dicts/lists read from a file) if Hydra would instantiate
    anything outside divo's torch modules and the trusted modules, or if it holds an
    interpolation (divo writes resolved configs; ``${oc.create:...}`` could hide a target)."""
    modules = trusted_modules(trust)
    for path, key, value in _walk(config):
        if isinstance(value, str) and "${" in value:
            raise UntrustedFileError(
                f"{where} holds an interpolation at {path} ({value!r}), which divo never "
                "writes; the file was edited: remove it"
            )
        if key == "_target_":
            _check_target(value, modules, where, path)


def config_modules(config: Any) -> tuple[str, ...]:
    """The modules of the ``_target_``s a config names outside divo (a caller that passes a
    config in code trusts them)."""
    found = {
        value.rsplit(".", 1)[0]
        for _, key, value in _walk(config)
        if key == "_target_" and isinstance(value, str) and "." in value
    }
    return tuple(sorted(m for m in found if not _under(m, DIVO) and _MODULE_NAME.fullmatch(m)))


def _check_entry_point(
    point: Any, base: type, what: str, spec: EnvSpec, modules: tuple[str, ...], where: str
) -> None:
    registered = gym.registry.get(spec.id)
    field = "vector_entry_point" if what == "vector_entry_point" else "entry_point"
    if registered is not None and what in ("entry_point", "vector_entry_point"):
        if point == getattr(registered, field):
            return  # what gym.make(spec.id) would run anyway
    module = point.split(":")[0] if isinstance(point, str) else ""
    if not module or not _MODULE_NAME.fullmatch(module):
        raise UntrustedFileError(
            f"{where} records environment {spec.id} with {what} {point!r}, which is not "
            "'module:Class'; the file was edited or is not a divo file"
        )
    trusted = _under(module, modules)
    if not trusted and not _under(module, ENV_PACKAGES):
        raise UntrustedFileError(
            f"{where} records environment {spec.id} with {what} {point}, outside gymnasium, "
            "gymnasium-robotics, ogbench, divo and the modules trusted for loading; "
            f"{_how_to_trust(module)}"
        )
    if trusted or base is None:
        return
    try:
        obj = gym.envs.registration.load_env_creator(point)
    except Exception as exc:  # noqa: BLE001 - an unknown name is the same user problem
        raise CheckpointError(
            f"{where} records environment {spec.id} with {what} {point}, which cannot be "
            f"imported ({first_line(exc)}); install the package it needs"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise UntrustedFileError(
            f"{where} records environment {spec.id} with {what} {point}, which is not a "
            f"{base.__module__}.{base.__qualname__} subclass; the file was edited or is not a "
            "divo file"
        )


# gymnasium wrappers with effects outside the process (files, windows)
OUTSIDE_WRAPPERS = ("RecordVideo", "HumanRendering")


def check_env_spec(spec_json: str, trust: Trust, where: str) -> EnvSpec:
    """The environment spec saved in a file, if building it runs only allowed code: its entry
    point, vector entry point and wrappers' entry points are in gymnasium, gymnasium-robotics,
    ogbench, divo or a trusted module, or it is a registered id with its registered entry point."""
    try:
        spec = EnvSpec.from_json(spec_json)
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{where} holds an environment spec that does not parse ({first_line(exc)}); the "
            "file is damaged or was edited"
        ) from None
    modules = trusted_modules(trust)
    _check_entry_point(spec.entry_point, gym.Env, "entry_point", spec, modules, where)
    if spec.vector_entry_point is not None:
        vector = spec.vector_entry_point
        _check_entry_point(vector, None, "vector_entry_point", spec, modules, where)
    for wrapper in spec.additional_wrappers:
        name = f"wrapper {wrapper.name}"
        _check_entry_point(wrapper.entry_point, gym.Wrapper, name, spec, modules, where)
        _refuse_side_effects(wrapper.entry_point, modules, spec, where)
    return spec


def _refuse_side_effects(point: str, modules: tuple[str, ...], spec: EnvSpec, where: str) -> None:
    """Gymnasium's wrappers that act outside the process (RecordVideo writes files where its
    arguments say, HumanRendering opens a window) are refused in a file's environment, unless
    their module is trusted: evaluating a policy needs neither."""
    module = point.split(":")[0]
    if _under(module, modules):
        return
    try:
        obj = gym.envs.registration.load_env_creator(point)
    except Exception:  # noqa: BLE001 - _check_entry_point said what it could
        return
    outside = tuple(
        getattr(gym.wrappers, name) for name in OUTSIDE_WRAPPERS if hasattr(gym.wrappers, name)
    )
    if isinstance(obj, type) and outside and issubclass(obj, outside):
        raise UntrustedFileError(
            f"{where} records environment {spec.id} with wrapper {point}, which writes files or "
            "opens windows; an evaluation needs neither: remove the wrapper from the file's "
            "environment (or trust its module by name)"
        )
