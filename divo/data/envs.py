"""divo's environments and how evaluation environments are made.

Importing this module registers divo's environments with Gymnasium (the multimodal bandit,
``divo/MultimodalBandit-v0``). :func:`make_env` builds an environment from an id or a saved
``EnvSpec``; a spec saved by an older divo that names an entry point since moved is mapped to
its new home (``MOVED_ENTRY_POINTS``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from typing import Any

import gymnasium as gym
from gymnasium.envs.registration import EnvSpec

from divo.errors import DatasetError, install_hint

BANDIT_ENV_ID = "divo/MultimodalBandit-v0"


def register_envs() -> None:
    """Register divo's environments with Gymnasium (idempotent: safe to call repeatedly)."""
    if BANDIT_ENV_ID not in gym.registry:
        gym.register(
            id=BANDIT_ENV_ID,
            # No max_episode_steps: the env ends every episode itself (terminated=True), and a
            # TimeLimit would also flag the same step as truncated.
            entry_point="divo.data.bandit:MultimodalBanditEnv",
        )


register_envs()

# Entry points an older divo saved in policy files' environment specs -> where they live now
MOVED_ENTRY_POINTS = {
    "divo.envs.bandit:MultimodalBanditEnv": "divo.data.bandit:MultimodalBanditEnv",
}


def current_spec(spec: EnvSpec) -> EnvSpec:
    """``spec`` with an entry point that has moved since it was saved mapped to its new home."""
    moved = MOVED_ENTRY_POINTS.get(spec.entry_point) if isinstance(spec.entry_point, str) else None
    return dataclasses.replace(spec, entry_point=moved) if moved else spec


def make_env(spec: EnvSpec | str, **kwargs: Any) -> gym.Env:
    """``gym.make(spec, **kwargs)`` for evaluation, without the noise of its wrappers.

    gymnasium's ``RescaleAction`` (which divo adds to the spec of data whose actions are not in
    [-1, 1]) builds float64 bounds for a float32 space and warns about the cast on every
    environment made; the cast is exact for [-1, 1], so that warning is dropped, as are the
    INFO lines MuJoCo's renderer setup logs through absl when an OGBench environment is first
    made (divo never renders). Maze envs' model files are removed (``remove_maze_xml``).
    """
    absl = logging.getLogger("absl")  # MuJoCo's renderer setup (OGBench's envs) logs at INFO
    level = absl.level
    absl.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")
            warnings.filterwarnings("ignore", message=".*DISPLAY environment variable")  # glfw
            env = gym.make(current_spec(spec) if isinstance(spec, EnvSpec) else spec, **kwargs)
    finally:
        absl.setLevel(level)
    remove_maze_xml(env)
    return env


def remove_maze_xml(env: gym.Env) -> None:
    """Delete the MJCF file a gymnasium-robotics maze env leaves in the temp folder.

    Every maze env writes its model to ``<tmp>/ant_maze<time>.xml`` (~8 kB) and never deletes
    it; MuJoCo has read it once the env exists, so it can go. Other envs: nothing happens.
    """
    path = getattr(env.unwrapped, "tmp_xml_file_path", None)
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


# --------------------------------------------------------------------------------------------
# OGBench (the ogbench extra): importing it registers its environments with gymnasium.

# The ogbench releases whose singletask rewards divo reads: since 1.2.0 the reward, the mask and
# success are computed on the state s of a transition (1.1.x: on s'); see divo.data.ogbench.
OGBENCH_PINNED_SERIES = "1.2."


def ogbench_version() -> str | None:
    """The installed ogbench's version, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ogbench")
    except PackageNotFoundError:
        return None


def require_ogbench() -> Any:
    """Import ogbench (registering its environments), or say which extra installs it; a
    release outside the pinned series is refused (its singletask rewards may differ)."""
    try:
        with warnings.catch_warnings():  # glfw's "no DISPLAY" on import: divo never renders
            warnings.simplefilter("ignore")
            import ogbench  # noqa: F401  (registers OGBench's environments with gymnasium)
            import ogbench.utils
        # OGBench's environments build float64 bounds for float32 spaces at their first reset,
        # and gymnasium warns about the (exact) cast every time: not the user's concern
        warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")
    except ImportError as exc:
        raise DatasetError(
            f"OGBench datasets need the ogbench package ({exc.name or 'ogbench'} is missing): "
            f"{install_hint('ogbench')}"
        ) from None
    version = ogbench_version()
    if version is not None and not version.startswith(OGBENCH_PINNED_SERIES):
        raise DatasetError(
            f"divo reads OGBench data as ogbench {OGBENCH_PINNED_SERIES}x defines them (reward, "
            f"mask and success on the state s), but ogbench {version} is installed, whose "
            "definitions "
            f"may differ; install the pinned one: {install_hint('ogbench')}"
        )
    return ogbench
