"""``divo data ...``: the dataset factory's commands.

divo data build <env id> [--levels ...] [--sac-steps N] [--size N] [--seed S] ...
divo data pointmaze <umaze|medium> [--steps N] [--seed S] ...
divo data ogbench <env> [--episodes N] [--kind play|noisy] [--seed S] [--dir D] ...
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from pathlib import Path

import torch

from divo.errors import ConfigError

USAGE = """usage: divo data <command> ...

commands:
  build <env id> [options]       train SAC and write D4RL-style Minari datasets (--help)
  pointmaze <umaze|medium> [...] sparse-reward maze data from a waypoint planner (--help)
  ogbench <env> [options]        OGBench manipulation data from OGBench's own oracles (--help)
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _build(argv: list[str]) -> int:
    from divo.data.factory.build import build_datasets

    ns = build_parser().parse_args(argv)
    torch.set_num_threads(ns.threads)
    sac, settings = build_settings(ns)
    report = build_datasets(
        ns.env_id,
        sac=sac,
        settings=settings,
        seed=ns.seed,
        work_dir=ns.work_dir,
        overwrite=ns.overwrite,
        progress=not ns.quiet,
    )
    for level, info in report["datasets"].items():
        print(
            f"divo data: {level}: {info['id']} ({info['episodes']} episodes, {info['steps']} "
            f"steps, mean episode return {info['mean_episode_return']:.1f})"
        )
    refs = report["references"]
    print(
        f"divo data: ref_min_score {refs['ref_min_score']:.1f}, ref_max_score "
        f"{refs['ref_max_score']:.1f}; summary in build.json of the work dir"
    )
    return 0


def build_settings(ns: argparse.Namespace):
    """``(SACSettings, BuildSettings)`` of a parsed ``divo data build`` command line."""
    from divo.data.factory.build import BuildSettings
    from divo.data.factory.sac import SACSettings

    sac = SACSettings(
        total_steps=ns.sac_steps,
        random_steps=ns.random_steps,
        snapshot_every=ns.snapshot_every,
        eval_episodes=ns.eval_episodes,
        batch_size=ns.batch_size,
        hidden_sizes=(ns.hidden, ns.hidden),
    )
    settings = BuildSettings(
        levels=tuple(level.strip() for level in ns.levels.split(",") if level.strip()),
        dataset_size=ns.size,
        medium_fraction=ns.medium_fraction,
        expert=ns.expert,
        ref_episodes=ns.ref_episodes,
        namespace=ns.namespace,
        version=ns.version,
    )
    return sac, settings


def build_parser() -> argparse.ArgumentParser:
    """The ``divo data build`` command line."""
    from divo.data.factory.build import DEFAULT_LEVELS, LEVELS, BuildSettings
    from divo.data.factory.sac import SACSettings

    sac_defaults, defaults = SACSettings(), BuildSettings()
    parser = argparse.ArgumentParser(
        prog="divo data build",
        description=(
            "Train SAC on a Gymnasium environment and write D4RL-style Minari datasets into the "
            "local Minari root (MINARI_DATASETS_PATH, else ~/.minari/datasets). Rerun the same "
            "command to resume an interrupted build."
        ),
    )
    parser.add_argument("env_id", help="Gymnasium id, e.g. Hopper-v5 (or module:Id)")
    parser.add_argument(
        "--levels",
        default=",".join(DEFAULT_LEVELS),
        help=f"comma-separated, from {', '.join(LEVELS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--size",
        type=_positive,
        default=defaults.dataset_size,
        help="transitions per random/medium/expert dataset (default %(default)s)",
    )
    parser.add_argument(
        "--sac-steps",
        type=_positive,
        default=sac_defaults.total_steps,
        help="SAC environment steps (default %(default)s)",
    )
    parser.add_argument(
        "--snapshot-every",
        type=_positive,
        default=sac_defaults.snapshot_every,
        help="steps between SAC snapshots (default %(default)s)",
    )
    parser.add_argument(
        "--random-steps",
        type=int,
        default=sac_defaults.random_steps,
        help="uniform random steps before SAC learns (default %(default)s)",
    )
    parser.add_argument(
        "--eval-episodes",
        type=_positive,
        default=sac_defaults.eval_episodes,
        help="episodes per snapshot evaluation (default %(default)s)",
    )
    parser.add_argument("--batch-size", type=_positive, default=sac_defaults.batch_size)
    parser.add_argument(
        "--hidden",
        type=_positive,
        default=sac_defaults.hidden_sizes[0],
        help="width of SAC's two hidden layers (default %(default)s)",
    )
    parser.add_argument(
        "--medium-fraction",
        type=float,
        default=defaults.medium_fraction,
        help="medium = snapshot closest to this share of the expert's return",
    )
    parser.add_argument("--expert", choices=("best", "final"), default=defaults.expert)
    parser.add_argument(
        "--ref-episodes",
        type=_positive,
        default=defaults.ref_episodes,
        help="episodes behind ref_min_score and ref_max_score",
    )
    parser.add_argument(
        "--namespace",
        default=defaults.namespace,
        help="dataset ids are <namespace>/<env>/<level>-v<version>",
    )
    parser.add_argument("--version", type=int, default=defaults.version)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work-dir",
        default=None,
        help="SAC checkpoints and snapshots (default runs/data/<env>-seed<seed>)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace datasets of the same ids made by another build",
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        default=1,
        help="torch threads (default 1: fastest for SAC's small networks)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _pointmaze(argv: list[str]) -> int:
    from divo.data.factory import pointmaze

    parser = argparse.ArgumentParser(
        prog="divo data pointmaze",
        description=(
            "Write a sparse-reward PointMaze dataset (gymnasium-robotics) collected by a "
            "waypoint planner and a PD controller, with no RL training."
        ),
    )
    parser.add_argument("maze", help=f"one of {', '.join(pointmaze.MAZES)}")
    parser.add_argument(
        "--steps",
        type=_positive,
        default=None,
        help="transitions (default: the maze's own default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--id",
        dest="dataset_id",
        default=None,
        help="dataset id (default divo/pointmaze/<maze>-v0)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=pointmaze.DEFAULT_NOISE,
        help="std of the Gaussian action noise (default %(default)s, as D4RL)",
    )
    parser.add_argument(
        "--ref-episodes",
        type=_positive,
        default=pointmaze.REF_EPISODES,
        help="episodes behind ref_min_score and ref_max_score (default %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    ns = parser.parse_args(argv)
    kwargs = {
        "noise": ns.noise,
        "ref_episodes": ns.ref_episodes,
        "seed": ns.seed,
        "dataset_id": ns.dataset_id,
        "overwrite": ns.overwrite,
        "progress": not ns.quiet,
    }
    if ns.steps is not None:
        kwargs["num_steps"] = ns.steps
    dataset = pointmaze.build_pointmaze_dataset(ns.maze, **kwargs)
    meta = dataset.storage.metadata
    print(
        json.dumps(
            {
                "id": dataset.id,
                "episodes": dataset.total_episodes,
                "steps": dataset.total_steps,
                "ref_min_score": meta.get("ref_min_score"),
                "ref_max_score": meta.get("ref_max_score"),
            },
            indent=2,
        )
    )
    return 0


def _ogbench(argv: list[str]) -> int:
    from divo.data import ogbench as reader
    from divo.data.factory import ogbench

    parser = argparse.ArgumentParser(
        prog="divo data ogbench",
        description=(
            "Generate an OGBench manipulation dataset with OGBench's own scripted oracles, in "
            "OGBench's file layout (<env>-<kind>-v0.npz and its -val.npz), with the episode "
            "length, counts and noise of OGBench's generation commands. Rerun the same command "
            "to resume an interrupted generation."
        ),
    )
    parser.add_argument("env", help=f"one of {', '.join(ogbench.GENERATED_ENVS)}")
    parser.add_argument(
        "--episodes",
        type=_positive,
        default=ogbench.EPISODES,
        help="training episodes of 1,000 transitions, plus a tenth as many for validation "
        "(default %(default)s, OGBench's)",
    )
    parser.add_argument("--kind", choices=ogbench.KINDS, default="play")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dir",
        default=None,
        help="output folder (default: divo's folder for generated OGBench data, "
        f"{reader.generated_dir()})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    parser.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="simulate this many chunks of episodes at once, one process each (default 1; "
        "up to the free cores): the same files, N chunks of episodes at a time",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    ns = parser.parse_args(argv)
    settings = ogbench.generation_settings(ns.env, ns.kind, ns.episodes, ns.seed)
    directory = reader.generated_dir() if ns.dir is None else ns.dir
    estimate = ogbench.estimate(settings, workers=ns.workers)
    print(f"divo data: {settings.dataset_name}: {estimate}", flush=True)
    record = ogbench.generate_ogbench_dataset(
        settings, directory, progress=not ns.quiet, overwrite=ns.overwrite, workers=ns.workers
    )
    train, val, _ = ogbench.dataset_paths(Path(directory).expanduser(), settings.dataset_name)
    print(
        f"divo data: wrote {train} ({record['transitions']['train']:,} transitions) and {val} "
        f"({record['transitions']['val']:,}); the oracle reached its target in "
        f"{100 * record['oracle_subtask_success_rate']:.1f}% of the "
        f"{record['oracle_subtasks_finished']:,} sub-tasks it finished"
    )
    return 0


SUBCOMMANDS = {"build": _build, "pointmaze": _pointmaze, "ogbench": _ogbench}


def data_command(argv: list[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    logging.getLogger("torchrl").setLevel(logging.WARNING)  # its per-storage INFO lines
    if command not in SUBCOMMANDS:
        close = difflib.get_close_matches(command, list(SUBCOMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(
            f"unknown data command {command!r}{hint}; use one of {', '.join(SUBCOMMANDS)}"
        )
    try:
        return SUBCOMMANDS[command](rest)
    except KeyboardInterrupt:
        print(
            "divo data: interrupted; rerun the same command to resume (SAC goes on from its "
            "last snapshot, OGBench generation from its last finished chunk of episodes; "
            "finished datasets are kept)",
            file=sys.stderr,
        )
        return 130
