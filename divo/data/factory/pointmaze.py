"""Sparse-reward PointMaze datasets in the spirit of D4RL's maze2d, made without RL.

A waypoint planner on the maze grid drives a PD controller, as D4RL (and Minari's
``D4RL/pointmaze`` datasets) did:

- **Planner**: breadth-first search over the free cells of ``env.unwrapped.maze.maze_map``
  (4-connected; walls are cells equal to 1) gives the shortest path from the agent's cell to the
  goal's cell. The waypoint is the centre of the next cell on that path, or the goal position
  itself once the agent is in the goal's cell.
- **PD controller**: ``action = clip(kp * (waypoint - position) - kd * velocity + noise, -1, 1)``
  with ``kp = 10``, ``kd = 1`` (D4RL's ``p_gain=10, d_gain=-1``: its damping gain is added, ours
  subtracted) and optional Gaussian action noise (D4RL's ``--noisy`` option: std 0.5).

Environments (gymnasium-robotics, ``pip install 'divo-rl[maze]'``):

- **collection**: ``continuing_task=True, reset_target=True`` (the goal jumps to a new random cell
  when reached, so one episode visits many goals), episodes of ``MAZES[maze].collect_steps``.
- **evaluation**: ``continuing_task=True, reset_target=False`` (one fixed goal per episode; reward
  1 on every step within 0.45 of it), D4RL maze2d's horizons (300 umaze, 600 medium).

Both are wrapped in ``gymnasium.wrappers.FlattenObservation``. Gymnasium's ``Dict`` space sorts
its keys, so the flat float32 observation is ``[achieved_goal x, y | desired_goal x, y |
observation x, y, vx, vy]`` (8 values; ``achieved_goal`` is the position, so it appears twice).
The wrapper is recorded in the env specs that Minari stores with the dataset
(``EnvSpec.additional_wrappers``), and ``gym.make(spec)`` loads the maze by its entry point: the
recovered environments give the same flat observation with gymnasium-robotics installed and no
import or registration by the caller (neither divo nor gymnasium_robotics need be imported).
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from minari.dataset.minari_dataset import parse_dataset_id
from tqdm.auto import tqdm

from divo.data.envs import remove_maze_xml
from divo.data.minari_io import EpisodeRecorder, write_minari_dataset
from divo.data.paths import get_dataset_path, is_local, publish_dataset
from divo.errors import DatasetError, install_hint


@dataclass(frozen=True)
class PointMaze:
    """One maze: its gymnasium-robotics id, horizons and default dataset size."""

    env_id: str
    eval_steps: int  # evaluation horizon (D4RL maze2d: 300 umaze, 600 medium)
    collect_steps: int  # length of a collection episode (the goal moves whenever reached)
    num_steps: int  # default number of transitions in the dataset


# Collection episodes are long (1,000 steps): Minari writes ~2 ms per episode, and the noisy
# controller reaches a goal every ~70 (umaze) / ~115 (medium) steps, so an episode visits ~15 /
# ~9 goals. D4RL's maze2d data held 1M (umaze) and 2M (medium) steps; the defaults here are a
# tenth of that: the umaze dataset is built in ~25 s and the medium one in ~50 s on one CPU core
# (collection, 2 x 100 reference episodes and the Minari write).
MAZES: dict[str, PointMaze] = {
    "umaze": PointMaze("PointMaze_UMaze-v3", eval_steps=300, collect_steps=1000, num_steps=100_000),
    "medium": PointMaze(
        "PointMaze_Medium-v3", eval_steps=600, collect_steps=1000, num_steps=200_000
    ),
}

# FlattenObservation's order (Dict keys sorted) and where the controller reads the flat vector.
FLAT_OBSERVATION_LAYOUT: tuple[tuple[str, int], ...] = (
    ("achieved_goal", 2),
    ("desired_goal", 2),
    ("observation", 4),
)
GOAL = slice(2, 4)  # desired_goal x, y
POSITION = slice(4, 6)  # observation x, y (= achieved_goal)
VELOCITY = slice(6, 8)  # observation vx, vy

KP = 10.0  # D4RL's waypoint controller: p_gain 10
KD = 1.0  # D4RL's waypoint controller: d_gain -1 (damping)
DEFAULT_NOISE = 0.5  # std of the Gaussian action noise in the data (D4RL's --noisy: 0.5)
GOAL_RADIUS = 0.45  # gymnasium-robotics: sparse reward 1 within 0.45 of the goal
REF_EPISODES = 100  # evaluation episodes behind each reference score
REF_SEED = 12345  # reference episode i is reset with REF_SEED + i (whatever the data seed)
ALGORITHM_NAME = "waypoint-planner+PD"
REQUIREMENT = "gymnasium-robotics>=1.4.2"  # stored in the metadata: Minari checks it on recovery

_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right (tie-break order)

Cell = tuple[int, int]


def pointmaze_dataset_id(maze: str) -> str:
    """The default id of the dataset of ``maze``: ``divo/pointmaze/<maze>-v0``."""
    maze_spec(maze)
    return f"divo/pointmaze/{maze}-v0"


def maze_spec(maze: str) -> PointMaze:
    """``MAZES[maze]``, or a DatasetError naming the known mazes."""
    try:
        return MAZES[maze]
    except (KeyError, TypeError):
        raise DatasetError(f"unknown maze {maze!r}; use one of {', '.join(MAZES)}") from None


def _require_robotics() -> None:
    """Import gymnasium-robotics and register its environments, or say how to install it."""
    try:
        # Its import prints a notice about Adroit reward changes, unrelated to the mazes.
        with contextlib.redirect_stderr(io.StringIO()):
            import gymnasium_robotics
    except ImportError as exc:
        raise DatasetError(
            f"the PointMaze datasets need gymnasium-robotics, which cannot be imported ({exc}); "
            f"install it with {install_hint('maze')}"
        ) from exc
    gym.register_envs(gymnasium_robotics)


def make_pointmaze_env(
    maze: str, *, evaluation: bool = False, max_episode_steps: int | None = None
) -> gym.Env:
    """The flat-observation PointMaze environment used for collection or evaluation.

    Args:
        maze: a key of ``MAZES``.
        evaluation: False: the collection env (the goal moves to a new random cell whenever it
            is reached); True: the evaluation env (one fixed goal per episode).
        max_episode_steps: the time limit; default ``collect_steps`` or ``eval_steps``.
    """
    spec = maze_spec(maze)
    _require_robotics()
    if max_episode_steps is None:
        max_episode_steps = spec.eval_steps if evaluation else spec.collect_steps
    env = gym.make(
        spec.env_id,
        continuing_task=True,
        reset_target=not evaluation,
        reward_type="sparse",
        max_episode_steps=max_episode_steps,
    )
    remove_maze_xml(env)
    return gym.wrappers.FlattenObservation(env)


class WaypointController:
    """Shortest-path waypoints on the maze grid followed by a PD controller; a policy on flat obs.

    Args:
        maze: the maze, a gymnasium-robotics ``Maze`` (``env.unwrapped.maze``; see
            ``from_env``): its ``maze_map``, ``cell_xy_to_rowcol`` and ``cell_rowcol_to_xy``.
        kp, kd: gains of ``action = kp * (waypoint - position) - kd * velocity``.
        noise: std of Gaussian noise added to the action before clipping to [-1, 1] (0: none).
        seed: seed of the noise generator.
    """

    def __init__(
        self,
        maze: Any,
        *,
        kp: float = KP,
        kd: float = KD,
        noise: float = 0.0,
        seed: int | tuple[int, ...] | None = None,
    ) -> None:
        if noise < 0:
            raise DatasetError(f"--noise={noise} must be >= 0 (the std of the action noise)")
        self.maze = maze
        self.kp, self.kd, self.noise = float(kp), float(kd), float(noise)
        self.rng = np.random.default_rng(seed)
        self.free = np.array([[cell != 1 for cell in row] for row in maze.maze_map], dtype=bool)
        self._scale = float(maze.maze_size_scaling)
        self._x_centre, self._y_centre = float(maze.x_map_center), float(maze.y_map_center)
        self._distances: dict[Cell, np.ndarray] = {}
        self._next_xy: dict[Cell, np.ndarray] = {}

    @classmethod
    def from_env(cls, env: gym.Env, **kwargs: Any) -> WaypointController:
        """A controller for the maze of a (wrapped) PointMaze environment."""
        return cls(env.unwrapped.maze, **kwargs)

    # -- planning on the grid --------------------------------------------------------------------

    def cell(self, xy: np.ndarray) -> Cell:
        """The grid cell ``(row, column)`` holding the point ``xy``.

        ``Maze.cell_xy_to_rowcol``'s formula on Python floats (cheaper in the per-step loop).
        """
        return self._cell(float(xy[0]), float(xy[1]))

    def _cell(self, x: float, y: float) -> Cell:
        return math.floor((self._y_centre - y) / self._scale), math.floor(
            (x + self._x_centre) / self._scale
        )

    def _is_free(self, cell: Cell) -> bool:
        rows, cols = self.free.shape
        return 0 <= cell[0] < rows and 0 <= cell[1] < cols and bool(self.free[cell])

    def distances(self, goal: Cell) -> np.ndarray:
        """Steps from every cell to ``goal`` along free cells (BFS; inf: wall or unreachable)."""
        if goal not in self._distances:
            distance = np.full(self.free.shape, np.inf)
            if self._is_free(goal):
                distance[goal] = 0
                queue = collections.deque([goal])
                while queue:
                    row, col = queue.popleft()
                    for d_row, d_col in _NEIGHBOURS:
                        nxt = (row + d_row, col + d_col)
                        if self._is_free(nxt) and distance[nxt] == np.inf:
                            distance[nxt] = distance[row, col] + 1
                            queue.append(nxt)
            self._distances[goal] = distance
        return self._distances[goal]

    def next_cell(self, cell: Cell, goal: Cell) -> Cell | None:
        """The next cell on a shortest path from ``cell`` to ``goal`` (None: there or no path)."""
        distance = self.distances(goal)
        if cell == goal or not self._is_free(cell) or distance[cell] == np.inf:
            return None
        for d_row, d_col in _NEIGHBOURS:
            nxt = (cell[0] + d_row, cell[1] + d_col)
            if self._is_free(nxt) and distance[nxt] == distance[cell] - 1:
                return nxt
        return None  # unreachable: distance[cell] is finite only with such a neighbour

    def shortest_path(self, start: Cell, goal: Cell) -> list[Cell]:
        """The cells of a shortest path from ``start`` to ``goal``, both included ([] if none)."""
        start, goal = tuple(map(int, start)), tuple(map(int, goal))
        if not self._is_free(start) or self.distances(goal)[start] == np.inf:
            return []
        path = [start]
        while path[-1] != goal:
            path.append(self.next_cell(path[-1], goal))
        return path

    def _waypoints_to(self, goal: Cell) -> np.ndarray:
        """``[rows, cols, 2]``: the xy centre of each cell's next cell towards ``goal`` (or NaN)."""
        if goal not in self._next_xy:
            table = np.full((*self.free.shape, 2), np.nan)
            for row, col in zip(*np.nonzero(self.free), strict=True):
                nxt = self.next_cell((int(row), int(col)), goal)
                if nxt is not None:
                    table[row, col] = self.maze.cell_rowcol_to_xy(np.array(nxt))
            self._next_xy[goal] = table
        return self._next_xy[goal]

    def _nearest_free_centre(self, xy: np.ndarray) -> np.ndarray:
        centres = np.array([self.maze.cell_rowcol_to_xy(rc) for rc in np.argwhere(self.free)])
        return centres[np.argmin(np.linalg.norm(centres - xy, axis=1))]

    def waypoint(self, position: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """Where to steer now: the next cell's centre on the path, or ``goal`` in its cell."""
        return np.array(
            self._waypoint(float(position[0]), float(position[1]), float(goal[0]), float(goal[1]))
        )

    def _waypoint(self, x: float, y: float, goal_x: float, goal_y: float) -> tuple[float, float]:
        here, there = self._cell(x, y), self._cell(goal_x, goal_y)
        if here == there:
            return goal_x, goal_y
        if not self._is_free(here):  # only by numerical slack at a wall: back to the open
            centre = self._nearest_free_centre(np.array([x, y]))
            return float(centre[0]), float(centre[1])
        target_x, target_y = self._waypoints_to(there)[here].tolist()
        if math.isnan(target_x):  # no path to the goal's cell: head straight for the goal
            return goal_x, goal_y
        return target_x, target_y

    # -- acting ----------------------------------------------------------------------------------

    def act(self, observation: np.ndarray) -> np.ndarray:
        """Action (float32, in [-1, 1]) for one flat observation ``[8]`` or a batch ``[n, 8]``."""
        observation = np.asarray(observation, dtype=np.float64)
        if observation.ndim == 2:
            return np.stack([self.act(row) for row in observation])
        goal_x, goal_y = observation[GOAL].tolist()
        x, y = observation[POSITION].tolist()
        vx, vy = observation[VELOCITY].tolist()
        waypoint_x, waypoint_y = self._waypoint(x, y, goal_x, goal_y)
        ax = self.kp * (waypoint_x - x) - self.kd * vx
        ay = self.kp * (waypoint_y - y) - self.kd * vy
        if self.noise > 0:
            nx, ny = self.rng.standard_normal(2).tolist()
            ax, ay = ax + self.noise * nx, ay + self.noise * ny
        return np.array([min(max(ax, -1.0), 1.0), min(max(ay, -1.0), 1.0)], dtype=np.float32)

    __call__ = act


def collect_pointmaze_episodes(
    maze: str,
    num_steps: int,
    *,
    seed: int = 0,
    noise: float = DEFAULT_NOISE,
    progress: bool = False,
    episode_steps: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Planner + PD episodes in the collection env, ``num_steps`` transitions in Minari's layout.

    The env is reset with ``seed`` once (later resets continue its random stream, so start and
    goal cells differ between episodes); the action noise comes from
    ``np.random.default_rng((seed, 1))``. Episodes end by the time limit (``episode_steps``,
    default ``MAZES[maze].collect_steps``; flagged truncated), the last one where the step budget
    runs out (also flagged truncated). Nothing terminates: the task is continuing.

    Returns:
        One dict per episode: ``observations [T+1, 8]`` float32 (flat, see the module doc),
        ``actions [T, 2]`` float32 (as executed), ``rewards [T]`` float64 (1 on a step that
        reaches the current goal, which then moves), ``terminations [T]``, ``truncations [T]``.
    """
    if int(num_steps) < 1:
        raise DatasetError(f"num_steps={num_steps} must be >= 1; ask for at least one transition")
    env = make_pointmaze_env(maze, max_episode_steps=episode_steps)
    controller = WaypointController.from_env(env, noise=noise, seed=(seed, 1))
    episodes: list[dict[str, np.ndarray]] = []
    bar = tqdm(
        total=int(num_steps),
        desc=f"pointmaze {maze}: collecting",
        unit="step",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    steps = 0
    try:
        while steps < num_steps:
            episode = EpisodeRecorder(env.reset(seed=seed if not episodes else None)[0])
            while not episode.done and steps < num_steps:
                action = controller(episode.last_observation)
                episode.add(action, *env.step(action)[:4])
                steps += 1
                if steps % 1000 == 0:
                    bar.update(1000)
            # cut off by the step budget: a truncation, never terminal
            episodes.append(episode.arrays(cut_off=True))
        bar.update(steps - bar.n)
    finally:
        bar.close()
        env.close()
    return episodes


def evaluate_in_pointmaze(
    maze: str,
    policy: Callable[[np.ndarray], np.ndarray] | None,
    *,
    episodes: int = REF_EPISODES,
    seed: int = REF_SEED,
    progress: bool | str = False,
) -> dict[str, np.ndarray]:
    """Run ``policy`` (flat obs -> action; None: uniform random) in the evaluation env.

    Episode ``i`` is reset with ``seed + i``; the random policy's actions come from the action
    space seeded with ``seed``. The expert of the reference scores is a noiseless
    ``WaypointController``.

    Returns:
        ``returns [episodes]`` (float64: steps spent within 0.45 of the goal) and
        ``success [episodes]`` (bool: the goal was reached at least once).
    """
    env = make_pointmaze_env(maze, evaluation=True)
    env.action_space.seed(seed)
    returns = np.zeros(episodes, dtype=np.float64)
    success = np.zeros(episodes, dtype=bool)
    bar = tqdm(
        total=episodes,
        desc=progress if isinstance(progress, str) else f"pointmaze {maze}: evaluating",
        unit="ep",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            done = False
            while not done:
                action = env.action_space.sample() if policy is None else policy(obs)
                obs, reward, terminated, truncated, _ = env.step(action)
                returns[i] += float(reward)
                done = terminated or truncated
            success[i] = returns[i] > 0
            bar.update(1)
    finally:
        bar.close()
        env.close()
    return {"returns": returns, "success": success}


def pointmaze_reference_scores(
    maze: str, *, episodes: int = REF_EPISODES, seed: int = REF_SEED, progress: bool = False
) -> tuple[float, float]:
    """``(ref_min_score, ref_max_score)``: mean evaluation returns of a uniform random policy and
    of the noiseless planner + PD controller over the same ``episodes`` start/goal pairs."""
    random = evaluate_in_pointmaze(
        maze, None, episodes=episodes, seed=seed, progress=progress and f"{maze}: random policy"
    )
    with contextlib.closing(make_pointmaze_env(maze, evaluation=True)) as env:
        controller = WaypointController.from_env(env)
    expert = evaluate_in_pointmaze(
        maze, controller, episodes=episodes, seed=seed, progress=progress and f"{maze}: planner"
    )
    return float(random["returns"].mean()), float(expert["returns"].mean())


def build_pointmaze_dataset(
    maze: str = "umaze",
    *,
    num_steps: int | None = None,
    seed: int = 0,
    noise: float = DEFAULT_NOISE,
    dataset_id: str | None = None,
    overwrite: bool = False,
    ref_episodes: int = REF_EPISODES,
    progress: bool = True,
) -> minari.MinariDataset:
    """Collect planner + PD data in ``maze`` and write it as a local Minari dataset.

    Args:
        maze: a key of ``MAZES`` (``umaze``, ``medium``).
        num_steps: transitions; default ``MAZES[maze].num_steps``.
        seed: seeds the collection env and the action noise (the dataset is a function of it).
        noise: std of the Gaussian action noise during collection.
        dataset_id: default ``divo/pointmaze/<maze>-v0``.
        overwrite: delete an existing local dataset of that id first (else it is an error).
        ref_episodes: evaluation episodes behind ``ref_min_score`` (uniform random policy) and
            ``ref_max_score`` (noiseless planner + PD); their resets use fixed seeds
            (``REF_SEED + i``), so the references do not depend on ``seed``.
        progress: tqdm bars over the collection and the reference episodes.

    Returns:
        The written dataset; its env spec is the collection env, its eval env spec the
        fixed-goal evaluation env, both with flat observations.
    """
    spec = maze_spec(maze)
    _require_robotics()
    num_steps = spec.num_steps if num_steps is None else int(num_steps)
    if ref_episodes < 1:
        raise DatasetError(f"ref_episodes={ref_episodes} must be >= 1 for the reference scores")
    dataset_id = pointmaze_dataset_id(maze) if dataset_id is None else dataset_id
    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):
        raise DatasetError(
            f"dataset id {dataset_id!r} is malformed; use (namespace/)name-v<version>, "
            "e.g. 'divo/pointmaze/umaze-v0'"
        ) from None
    if is_local(dataset_id) and not overwrite:
        raise DatasetError(
            f"dataset {dataset_id!r} already exists at {get_dataset_path(dataset_id)}; pass "
            "overwrite=True to rebuild it, or choose another dataset_id"
        )

    episodes = collect_pointmaze_episodes(
        maze, num_steps, seed=seed, noise=noise, progress=progress
    )
    ref_min, ref_max = pointmaze_reference_scores(maze, episodes=ref_episodes, progress=progress)
    layout = ", ".join(f"{key}[{size}]" for key, size in FLAT_OBSERVATION_LAYOUT)
    description = (
        f"PointMaze {maze} ({spec.env_id}, gymnasium-robotics), sparse reward: 1 on a step "
        f"within {GOAL_RADIUS} of the goal. Data: {num_steps} steps in {len(episodes)} "
        f"episodes of up to {spec.collect_steps} steps in the collection env "
        "(continuing_task=True, reset_target=True: the goal moves to a random cell when "
        f"reached), reset seeded once with seed {seed}. Actions: a waypoint planner (BFS "
        "shortest path over free maze cells; waypoint = centre of the next cell, the goal "
        f"itself in the goal's cell) and a PD controller a = clip({KP:g} * (waypoint - "
        f"position) - {KD:g} * velocity + N(0, {noise:g}^2), -1, 1), noise generator seeded "
        f"with ({seed}, 1). Observations: the Dict observation flattened by "
        f"gymnasium.wrappers.FlattenObservation (keys sorted): {layout} = achieved x, y | "
        "goal x, y | x, y, vx, vy; float32. Evaluation env: one fixed goal per episode "
        f"(continuing_task=True, reset_target=False), {spec.eval_steps} steps. ref_min_score "
        "/ ref_max_score: mean evaluation return of a uniform random policy / of the "
        f"noiseless planner + PD over {ref_episodes} episodes (reset seeds {REF_SEED} + i)."
    )
    env = make_pointmaze_env(maze)
    eval_env = make_pointmaze_env(maze, evaluation=True)

    def write() -> None:  # in a scratch root, published whole (metadata included) at the end
        dataset = write_minari_dataset(
            dataset_id,
            episodes,
            env=env,
            eval_env=eval_env,
            ref_min_score=ref_min,
            ref_max_score=ref_max,
            algorithm_name=ALGORITHM_NAME,
            description=description,
        )
        dataset.storage.update_metadata({"requirements": [REQUIREMENT]})

    try:
        publish_dataset(dataset_id, write, replace=overwrite)
    finally:
        env.close()
        eval_env.close()
    return minari.load_dataset(dataset_id)


__all__ = [
    "DEFAULT_NOISE",
    "FLAT_OBSERVATION_LAYOUT",
    "KD",
    "KP",
    "MAZES",
    "PointMaze",
    "WaypointController",
    "build_pointmaze_dataset",
    "collect_pointmaze_episodes",
    "evaluate_in_pointmaze",
    "make_pointmaze_env",
    "maze_spec",
    "pointmaze_dataset_id",
    "pointmaze_reference_scores",
    "remove_maze_xml",
]
