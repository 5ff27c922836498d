"""Saved policies: rebuild the deployable policy from ``policy.pt`` or a checkpoint and run it.

Needs nothing of the training state: the actor's config, its weights with the normalisation
statistics, the environment spec and the score references travel in the file.

A policy file is data: it is read without unpickling objects (:func:`read_file`), its contents
are checked against the SHA-256 saved with them (a damaged file is refused, not used), and the
classes its config names and the environment its spec names are checked against an allow-list
(:mod:`divo.agents.trust`) before anything is imported or built.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from gymnasium.envs.registration import EnvSpec
from hydra.utils import instantiate

from divo.agents.evaluate import evaluate_policy
from divo.agents.formats import OLDER_POLICY_FORMATS, POLICY_FORMAT, accept_checkpoint
from divo.agents.runtime import resolve_device
from divo.agents.trust import Trust, check_config, check_env_spec
from divo.data.envs import make_env
from divo.errors import CheckpointError, ConfigError, first_line
from divo.files import damaged_file_error, read_file


def find_policy_file(path: str | Path) -> Path:
    """A run directory -> its policy.pt, else its newest checkpoint; a file -> itself."""
    path = Path(path)
    if path.is_dir():
        if (path / "policy.pt").is_file():
            return path / "policy.pt"
        ckpts = sorted((path / "checkpoints").glob("step_*.pt"))
        if ckpts:
            return ckpts[-1]
        seeds = sorted(p.parent.name for p in path.glob("seed*/policy.pt"))
        if seeds:  # the top folder of a train.num_seeds run
            raise CheckpointError(
                f"{path} is a run of {len(seeds)} stacked seeds ({', '.join(seeds)}); evaluate "
                f"one of them, e.g. divo evaluate {path / seeds[0]}"
            )
        raise CheckpointError(
            f"{path} holds no policy.pt and no checkpoints/step_*.pt; is it a run directory?"
        )
    return path


def _read_policy(file: Path) -> dict:
    """The policy payload of a policy file or checkpoint, its checksum checked (a file of an
    older divo has none: it loads unchecked)."""
    payload, checked = read_file(file)
    found = payload.get("format") if isinstance(payload, dict) else None
    if isinstance(found, str) and found.startswith("divo-checkpoint"):
        payload = accept_checkpoint(payload, checked, file).get("policy")
    elif found == POLICY_FORMAT and not checked:
        raise damaged_file_error(
            file, f"a {found} file carries the checksum of its contents, and it has none"
        )
    if not isinstance(payload, dict) or payload.get("format") not in (
        POLICY_FORMAT,
        *OLDER_POLICY_FORMATS,
    ):
        raise CheckpointError(f"{file} is not a divo policy or checkpoint file")
    return payload


def check_policy_payload(payload: dict, trust: Trust, where: str | Path) -> EnvSpec | None:
    """Refuse a policy payload whose config names classes, or whose environment spec names
    entry points, outside divo, gymnasium and the trusted modules; returns its spec (if any)."""
    check_config(payload.get("policy_config"), trust, str(where))
    spec = payload.get("env_spec")
    return check_env_spec(spec, trust, str(where)) if spec is not None else None


def policy_settings(config: Mapping) -> dict[str, Any]:
    """The settings of a saved policy's config that :func:`load_policy` may change: its
    top-level numbers, strings and booleans (e.g. IDQL's ``selection`` and ``num_samples``),
    not the parts it is built from nor the class it names."""
    return {
        k: v
        for k, v in config.items()
        if k != "_target_" and (v is None or isinstance(v, (bool, int, float, str)))
    }


def _apply_settings(config: dict, settings: Mapping[str, Any], file: Path) -> dict:
    allowed = policy_settings(config)
    unknown = [k for k in settings if k not in allowed]
    if unknown:
        names = ", ".join(sorted(allowed)) or "none"
        raise ConfigError(
            f"{file}: the saved policy ({config.get('_target_')}) has no setting "
            f"{', '.join(map(repr, unknown))}; its settings: {names}"
        )
    bad = [
        k for k, v in settings.items() if not (v is None or isinstance(v, (bool, int, float, str)))
    ]
    if bad:
        raise ConfigError(f"{file}: settings take a number, a string or a boolean: {bad}")
    return {**config, **settings}


def _rebuild_error(file: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot rebuild the policy saved in {file} ({type(exc).__name__}: {exc}); it was "
        "written by an incompatible divo version or recipe"
    )


def load_policy(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    trust: Trust = None,
    settings: Mapping[str, Any] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Rebuild the policy saved at ``path``; returns it and the file's metadata (``env``: its
    environment spec, checked, or None).

    ``trust``: module names (e.g. ``["my_pkg"]``) whose classes the file may name besides
    divo's, for policies over plugged-in behaviour models. Nothing else named by the file is
    imported: such a file is refused with :class:`divo.errors.UntrustedFileError`.

    ``settings``: new values for the saved policy's own settings (:func:`policy_settings`),
    e.g. ``{"selection": "argmax", "num_samples": 256}`` to deploy a trained IDQL model with its
    code's pick or IDQL's inference sweep; the policy's class checks them as it is built.
    """
    file = find_policy_file(path)
    payload = _read_policy(file)
    spec = check_policy_payload(payload, trust, file)
    config = payload["policy_config"]
    if settings:
        config = _apply_settings(dict(config), settings, file)
        check_config(config, trust, str(file))  # a new value is data too (no interpolation)
    try:
        policy = instantiate(config, _convert_="all")  # the class checks any new settings
    except Exception as exc:  # noqa: BLE001
        if settings:  # the class's own message names the problem (Hydra wraps it)
            cause = exc.__cause__ or exc
            raise ConfigError(
                f"{file}: cannot apply the settings {dict(settings)}: {cause}"
            ) from None
        raise _rebuild_error(file, exc) from None
    try:
        policy.load_state_dict(payload["state_dict"])
    except Exception as exc:  # noqa: BLE001 - a file from an incompatible version or edit
        raise _rebuild_error(file, exc) from None
    policy.to(device).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["policy_config"] = config
    meta["settings"] = dict(settings or {})
    meta["file"] = str(file)
    meta["env"] = spec
    return policy, meta


# what an evaluation of a saved policy uses when its run's config.yaml is not beside it
DEFAULT_EPISODES, DEFAULT_SEED = 10, 100


def run_protocol(path: str | Path) -> tuple[int, int, bool]:
    """(episodes, seed of the first episode, found) of the evaluations the run that saved
    ``path`` (a run directory, its policy.pt, or one of its checkpoints) made in training: its
    config.yaml's ``train.eval_episodes`` and ``seed + 100`` (method.md). ``found`` is False,
    with (10, 100), when no readable config.yaml is beside it. The file is read as YAML data."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if folder.name == "checkpoints":
        folder = folder.parent
    config = folder / "config.yaml"
    if not config.is_file():
        return DEFAULT_EPISODES, DEFAULT_SEED, False
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(config)
    except Exception as exc:  # noqa: BLE001 - there but unreadable: never silently the defaults
        raise ConfigError(
            f"{config} cannot be read ({type(exc).__name__}): the run's evaluation protocol "
            "(its episodes and seed) is unknown; give both (--episodes N --seed S, or "
            "episodes=/seed= in Python), or restore the file"
        ) from None
    try:
        episodes, seed = int(cfg.train.eval_episodes), int(cfg.seed) + 100
    except Exception:  # noqa: BLE001 - readable, but not a divo run's config: the defaults
        return DEFAULT_EPISODES, DEFAULT_SEED, False
    return (episodes, seed, True) if episodes > 0 else (DEFAULT_EPISODES, seed, True)


def evaluate_saved_policy(
    path: str | Path,
    *,
    episodes: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    trust: Trust = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a saved policy in the environment recorded with it (``trust``, ``settings``: as
    for :func:`load_policy`; the result records the settings). ``episodes`` and ``seed`` (of
    the first episode) default to those of the run's own evaluations (:func:`run_protocol`),
    so that a run's result is reproduced; the result records both."""
    for name, value, least in (("episodes", episodes, 1), ("seed", seed, 0)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            raise ConfigError(f"{name}={value!r} must be an integer >= {least}")
    if episodes is None or seed is None:
        protocol = run_protocol(path)
    else:
        protocol = (episodes, seed, False)  # both given: config.yaml is not needed
    episodes = protocol[0] if episodes is None else int(episodes)
    seed = protocol[1] if seed is None else int(seed)
    dev = resolve_device(device)
    policy, meta = load_policy(path, dev, trust=trust, settings=settings)
    spec = meta["env"]
    if spec is None:
        raise CheckpointError(
            f"{meta['file']} records no environment (its dataset had none); evaluate it in "
            "your own environment from Python: policy, info = divo.load_policy(run), then "
            "step it with policy(observation)"
        )

    try:  # an environment that cannot be made here is a one-line error, not a traceback
        make_env(spec).close()
    except Exception as exc:  # noqa: BLE001 - missing package or module, unregistered id, ...
        raise CheckpointError(
            f"the environment recorded with {meta['file']} ({getattr(spec, 'id', spec)}) "
            f"cannot be made here ({type(exc).__name__}: {first_line(exc)}); install "
            "what it needs, or make its module importable (on PYTHONPATH)"
        ) from None
    score = meta.get("score", "return")  # files before OGBench support: D4RL's score
    # goal-reaching (OGBench) environments are slow to build: reuse a few, as training does
    pool = [make_env(spec) for _ in range(min(10, episodes))] if score == "success" else None
    try:
        result = evaluate_policy(
            policy,
            lambda: make_env(spec),
            episodes=episodes,
            seed=seed,
            device=dev,
            ref_min_score=meta.get("ref_min_score"),
            ref_max_score=meta.get("ref_max_score"),
            score=score,
            envs=pool,
        )
    finally:
        for env in pool or []:
            env.close()
    result["source"] = meta["file"]
    result["seed"] = seed
    result["step"] = meta.get("step")
    result["recipe"] = meta.get("recipe")
    result["dataset_id"] = meta.get("dataset_id")
    if meta["settings"]:
        result["settings"] = meta["settings"]
    return result
