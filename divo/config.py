"""Recipes: where they live, resolving a name or a path, and composing one with overrides.

``compose_recipe("divo", ["train.steps=2000"])`` gives the config ``divo train divo
train.steps=2000`` runs; a misspelt key or recipe is a one-line :class:`ConfigError` with the
closest names. The CLI, the studies and the report compose recipes through this module only.
"""

from __future__ import annotations

import difflib
import importlib.resources
import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from divo.errors import ConfigError

if not OmegaConf.has_resolver("slug"):
    # ${slug:${dataset.id}} -> a dataset id usable as one folder name in run paths.
    OmegaConf.register_new_resolver("slug", lambda s: str(s).replace("/", "-"))
if not OmegaConf.has_resolver("sweep_leaf"):
    # ${sweep_leaf:${hydra.job.override_dirname}} -> "" or "/<the swept key=value pairs>", one
    # folder level, for a sweep job's folder (recipes/common/base.yaml)
    OmegaConf.register_new_resolver(
        "sweep_leaf", lambda s: f"/{str(s).replace('/', '-')}" if str(s) else ""
    )


def recipes_dir() -> Path:
    """The folder of shipped recipes (``recipes/`` of the repository, ``divo.recipes``)."""
    return Path(str(importlib.resources.files("divo.recipes")))


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def resolve_recipe(recipe: str) -> tuple[Path, str, bool]:
    """Recipe name or YAML path -> (config dir, config name, is a user file)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file {recipe} does not exist; check the path")
        return path.resolve().parent, path.stem, True
    if recipe in available_recipes():
        return recipes_dir(), recipe, False
    close = difflib.get_close_matches(recipe, available_recipes(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(
        f"unknown recipe {recipe!r}{hint}; choose one of {', '.join(available_recipes())} or "
        "pass a path to a .yaml file"
    )


def _missing_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys whose value is ``???``, found without resolving interpolations (a value that
    interpolates a missing one must not hide the missing one)."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return [prefix] if node == "???" else []
    return sorted(
        key for k, v in items for key in _missing_keys(v, f"{prefix}.{k}" if prefix else str(k))
    )


def compose_recipe(recipe: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a recipe with overrides, as ``divo train`` does, without running it."""
    return compose_config(recipe, overrides, with_hydra=False)


def compose_config(
    recipe: str, overrides: Sequence[str] = (), *, with_hydra: bool = False
) -> DictConfig:
    """:func:`compose_recipe`; ``with_hydra`` keeps Hydra's own node (the run directory)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir, name, user = resolve_recipe(recipe)
    overrides = list(overrides)
    if user:
        overrides.append(f"hydra.searchpath=[pkg://divo.recipes,file://{config_dir}]")
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name=name, overrides=overrides, return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException) as exc:
        unknown = re.search(r"Could not override '([^']+)'", str(exc))
        if unknown:
            raise unknown_key_error(recipe, unknown.group(1), overrides) from None
        option = re.search(r"Could not find '([\w-]+)/([^']+)'", str(exc))
        if option:
            error = unknown_option_error(recipe, option.group(1), option.group(2), config_dir)
            raise error from None
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise ConfigError(
            f"recipe {recipe!r} with overrides {' '.join(overrides) or '(none)'} does not "
            f"compose: {' '.join(lines[:3])}; check the override names with `divo train "
            f"{recipe} --cfg job`"
        ) from None
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    _check_added_keys(recipe, overrides, container)
    missing = _missing_keys(container)
    if missing:
        raise ConfigError(
            f"recipe {recipe!r} needs a value for {', '.join(missing)}; pass it as an override, "
            f"e.g. {missing[0]}=..."
        )
    return cfg


def group_options(group: str, config_dir: Path | None = None) -> list[str]:
    """The options of a config group: its YAML files in the shipped recipes (and in a user
    recipe's folder)."""
    folders = {recipes_dir() / group} | ({config_dir / group} if config_dir else set())
    return sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})


def unknown_option_error(
    recipe: str, group: str, option: str, config_dir: Path | None = None
) -> ConfigError:
    """``group=option`` names no file of the group: every option it has, the closest first."""
    options = group_options(group, config_dir)
    close = difflib.get_close_matches(option, options, n=2, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return ConfigError(
        f"recipe {recipe!r}: {group} has no option {option!r}{hint}; its options are "
        f"{', '.join(options)}"
    )


# Sections divo reads key by key: a key added there with +key is never read, so it would be
# ignored in silence (a component's own node, e.g. +behavior_model.num_components=4, goes to
# its constructor, which refuses an unknown argument itself)
RUN_SECTIONS = ("train", "dataset", "logger", "optim")
# top-level settings divo reads when a recipe has them and defaults when it does not
OPTIONAL_SETTINGS = (
    "algorithm",
    "compile",
    "graph_stages",
    "normalize_observations",
    "evaluation_policy",
    "actor",
    "behavior_model",
    "selector",
    "value",
    "weighting",
)


def _check_added_keys(recipe: str, overrides: Sequence[str], container: dict) -> None:
    """Refuse ``+key=value`` at the top level or in a section divo reads key by key: such a key
    is new (``+`` only adds), so divo would never read it (``+train.step=100`` would start a
    run with the default ``train.steps``). A component's node takes new keys: they are its
    constructor's arguments, which it checks itself."""
    added = [o for o in overrides if o.startswith("+") and "=" in o]
    for override in added:
        key = override.split("=", 1)[0].lstrip("+")
        section = key.split(".", 1)[0]
        if key.startswith("optim.adam."):
            continue  # torch.optim.Adam's arguments (recipes/common/base.yaml)
        if "." in key and section not in RUN_SECTIONS and _is_component(container, key):
            continue  # a component's constructor argument: the component checks it
        if key in OPTIONAL_SETTINGS:
            continue  # read when present (e.g. +algorithm=diffusion_ql in a recipe of one's own)
        new = {o.split("=", 1)[0].lstrip("+") for o in added}
        keys = [k for k in config_keys(container) if k not in new]
        hint = did_you_mean(key, keys) or _same_name(key, keys)
        fix = "fix the name" if hint else f"list them with `divo train {recipe} --cfg job`"
        raise ConfigError(
            f"recipe {recipe!r} has no setting {key} (override {override}), and divo never "
            f"reads a new one there{hint}; {fix}"
        )


def _is_component(container: dict, key: str) -> bool:
    """Whether ``key``'s parent node is a component divo builds from its ``_target_`` (whose
    constructor takes the new key as an argument), not a section divo reads key by key."""
    node: object = container
    for part in key.split(".")[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    return isinstance(node, dict) and "_target_" in node


def _same_name(key: str, keys: Sequence[str]) -> str:
    """`` (did you mean a?)`` for existing keys whose last name is ``key``'s, or ``""``."""
    last = key.rsplit(".", 1)[-1]
    close = [k for k in keys if k.rsplit(".", 1)[-1] == last and k != key][:2]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def config_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a config container (inner nodes too)."""
    if not isinstance(node, dict):
        return []
    keys = []
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        keys += [key, *config_keys(v, key)]
    return keys


def did_you_mean(key: str, keys: Sequence[str]) -> str:
    """`` (did you mean a, b?)`` for the keys closest to a misspelt ``key``, or ``""``."""
    same_depth = [k for k in keys if k.count(".") == key.count(".")]
    close = difflib.get_close_matches(key, same_depth, n=2, cutoff=0.75)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def unknown_key_error(recipe: str, key: str, overrides: Sequence[str]) -> ConfigError:
    """An override naming a key the recipe lacks: the closest keys it has, else how to add one."""
    given = next((o for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), key)
    groups = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0]]
    try:
        cfg = compose_config(recipe, [g for g in groups if g != given])
        keys = config_keys(OmegaConf.to_container(cfg, resolve=False))
    except ConfigError:
        keys = []
    hint = did_you_mean(key, keys) or _same_name(key, keys)
    component = (
        "." in key
        and key.split(".", 1)[0] not in RUN_SECTIONS
        and _is_component(OmegaConf.to_container(cfg, resolve=False), key)
        if keys
        else False
    )
    fix = "fix the name" if hint else f"list the keys with `divo train {recipe} --cfg job`"
    if not hint and component:  # a component's constructor argument may be added
        fix += f", or pass a new argument of that part with +{given.lstrip('+')}"
    return ConfigError(f"recipe {recipe!r} has no key {key} (override {given}){hint}; {fix}")


# a setting looked up by dataset id: ${oc.select:"<table>.${dataset.id}.<key>",<fallback>}
_PER_DATASET = re.compile(r'\$\{oc\.select:"([\w.]+)\.\$\{dataset\.id\}\.(\w+)"')


def dataset_settings(cfg: DictConfig) -> list[dict]:
    """The settings a recipe looks up by dataset id (``fql.tasks``, ``diffusion_ql.tasks``,
    ``per_dataset``: the references' per-task flags), one record per table it reads:
    ``table``, ``entry`` (whether ``dataset.id`` has an entry there, else the fallback ran),
    ``tuned`` (the table has a ``default`` entry: the reference tunes these per task, so its
    defaults are not a setting for every dataset) and ``values`` (setting path -> the value
    the run uses). A setting overridden on the command line is no longer a lookup and is left
    out. Empty for recipes without such tables or runs without a dataset id."""
    dataset_id = OmegaConf.select(cfg, "dataset.id")
    if dataset_id is None:
        return []
    found: dict[str, dict] = {}

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, str):
            match = _PER_DATASET.search(node)
            if match:
                table = match.group(1)
                record = found.setdefault(table, {"table": table, "values": {}})
                record["values"][path] = OmegaConf.select(cfg, path)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    for table, record in found.items():
        entries = OmegaConf.select(cfg, table)
        keys = set(entries.keys()) if isinstance(entries, DictConfig) else set()
        record["entry"] = str(dataset_id) in keys
        record["tuned"] = "default" in keys
    return list(found.values())
