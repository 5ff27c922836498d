"""The front door: the functions ``import divo`` gives (``divo.compose``, ``divo.train``,
``divo.load_policy``, ``divo.load_offline_data``, ``divo.evaluate``).

Each is the library function of its own module (named below), re-exported so that a script
needs no module paths; ``divo/__init__.py`` imports this module only when one is first used,
so ``import divo`` stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from divo.agents.policy_io import evaluate_saved_policy, load_policy
from divo.agents.train import train as _train
from divo.config import compose_recipe
from divo.data.load import OfflineData
from divo.data.load import load_offline_data as _load_offline_data
from divo.errors import ConfigError


def compose(recipe: str | PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """A recipe (a name from ``recipes/`` or a path to a YAML file) composed with Hydra
    overrides, as ``divo train <recipe> <overrides...>`` composes it, without running it."""
    if isinstance(overrides, str):
        raise ConfigError(
            f"overrides must be a list of strings, e.g. [{overrides!r}], not one string (it "
            "would be read character by character)"
        )
    if not isinstance(recipe, str | PathLike):
        raise ConfigError(
            f"recipe must be a recipe name or a path to a recipe file, not {type(recipe).__name__}"
            "; for a config, pass the result of divo.compose(recipe, overrides)"
        )
    return compose_recipe(str(recipe), list(overrides))


def train(
    cfg_or_recipe: DictConfig | str | PathLike,
    run_dir: str | PathLike,
    *,
    overrides: Sequence[str] = (),
    **kwargs: Any,
) -> dict[str, Any]:
    """Train a composed config, or a recipe by name or path with ``overrides``, into
    ``run_dir`` (the files ``divo train`` writes); returns the result (``result.json``).

    ``kwargs`` go to :func:`divo.agents.train.train`: ``replay_buffer`` (a TorchRL buffer of
    your own), ``obs_stats``, ``resume`` (default True: an existing run continues from its newest
    checkpoint) and ``trust``.
    """
    if isinstance(cfg_or_recipe, DictConfig):
        if overrides:
            raise ConfigError(
                "overrides apply to a recipe name or path; for a composed config, compose it "
                "with them: divo.train(divo.compose(recipe, overrides), run_dir)"
            )
        cfg = cfg_or_recipe
    else:
        cfg = compose(cfg_or_recipe, overrides)
    return _train(cfg, Path(run_dir), **kwargs)


def load_offline_data(dataset: str | DictConfig, **kwargs: Any) -> OfflineData:
    """A dataset, as an :class:`OfflineData` (``.data``: the transitions as one TED
    TensorDict; its statistics, reference scores and evaluation environments beside them).

    ``dataset`` is a dataset id, loaded with the keywords given and no others
    (:func:`divo.data.load.load_offline_data`: by default no reward transform), or a composed
    recipe (``divo.compose(...)``), loaded as ``divo train`` trains on it: its reward
    transform (``iql``'s ``return_range``, AntMaze's ``reward_shift``), action bounds,
    observation keys and source; then only ``device`` may be given. A TorchRL loop over a
    recipe's loss module reads the rewards as given, so load its data this way."""
    if isinstance(dataset, DictConfig):
        others = sorted(set(kwargs) - {"device"})
        if others:
            raise ConfigError(
                f"divo.load_offline_data(cfg) loads the recipe's dataset with the recipe's "
                f"settings; set {', '.join(others)} in the recipe (dataset.*), not as keywords"
            )
        from divo.agents.runs import load_recipe_data

        return load_recipe_data(dataset, kwargs.get("device", "cpu"))
    return _load_offline_data(dataset, **kwargs)


def evaluate(
    path: str | PathLike, *, episodes: int | None = None, seed: int | None = None, **kwargs: Any
):
    """Evaluate a saved policy (a run directory, its policy.pt or a checkpoint) as ``divo
    evaluate`` does: by default with the episodes and evaluation seed of the run's own
    evaluations (its config.yaml), so its result is reproduced; ``kwargs`` (``device``,
    ``trust``, ``settings``) go to :func:`divo.agents.policy_io.evaluate_saved_policy`. Returns
    its result dictionary."""
    return evaluate_saved_policy(path, episodes=episodes, seed=seed, **kwargs)


__all__ = ["OfflineData", "compose", "evaluate", "load_offline_data", "load_policy", "train"]
