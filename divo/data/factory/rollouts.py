"""Run a policy in a Gymnasium environment and keep the episodes in Minari's layout.

``run_episodes`` steps ``num_envs`` copies of the environment in lockstep so that the policy is
called once per step on a batch of observations; episode ``i`` is reset with ``seed + i``, so
its first observation depends only on the seed. A stochastic policy draws its actions from one
generator for the whole batch, so its episodes also depend on ``num_envs`` (the same seed and
``num_envs`` give the same episodes).
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm.auto import tqdm

from divo.data.minari_io import EpisodeRecorder

Act = Callable[[np.ndarray], np.ndarray]  # observations [n, O] -> actions [n, A]


def run_episodes(
    make_env: Callable[[], gym.Env],
    act: Act,
    *,
    seed: int,
    num_episodes: int | None = None,
    num_steps: int | None = None,
    num_envs: int = 8,
    progress: bool | str = False,
) -> list[dict[str, np.ndarray]]:
    """Episodes of ``act`` in Minari's layout (see ``divo.data.minari_io``).

    Exactly one of ``num_episodes`` (whole episodes) and ``num_steps`` (that many transitions;
    episodes still running when the budget is spent are cut off and their last step flagged
    truncated) must be given. ``progress``: False, or a label for a tqdm bar.
    """
    if (num_episodes is None) == (num_steps is None):
        raise ValueError("give exactly one of num_episodes and num_steps")
    target = num_episodes if num_episodes is not None else num_steps
    bar = tqdm(
        total=target,
        desc=progress if isinstance(progress, str) else None,
        unit="ep" if num_episodes is not None else "step",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    envs = [make_env() for _ in range(max(1, min(num_envs, num_episodes or num_envs)))]
    finished: list[tuple[int, dict[str, np.ndarray]]] = []
    started = 0
    steps = 0
    running: dict[int, tuple[int, EpisodeRecorder]] = {}  # env slot -> (episode index, episode)

    def start(slot: int) -> None:
        nonlocal started
        observation, _ = envs[slot].reset(seed=seed + started)
        running[slot] = (started, EpisodeRecorder(observation))
        started += 1

    for slot in range(len(envs)):
        if num_episodes is None or started < num_episodes:
            start(slot)
    try:
        while running and (num_steps is None or steps < num_steps):
            slots = sorted(running)
            if num_steps is not None:
                slots = slots[: num_steps - steps]  # never overshoot the step budget
            observations = np.stack([running[s][1].last_observation for s in slots])
            actions = np.asarray(act(observations), dtype=np.float32)
            for slot, action in zip(slots, actions, strict=True):
                index, episode = running[slot]
                episode.add(action, *envs[slot].step(action)[:4])
                steps += 1
                if num_steps is not None:
                    bar.update(1)
                if episode.done:
                    finished.append((index, episode.arrays(cut_off=False)))
                    del running[slot]
                    if num_episodes is not None:
                        bar.update(1)
                    if num_episodes is None or started < num_episodes:
                        start(slot)
        for index, episode in running.values():  # the step budget ran out mid-episode
            if len(episode):
                finished.append((index, episode.arrays(cut_off=True)))
    finally:
        bar.close()
        for env in envs:
            env.close()
    return [episode for _, episode in sorted(finished, key=lambda item: item[0])]


def episode_returns(episodes: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Undiscounted return of each episode."""
    return np.asarray([float(np.sum(e["rewards"])) for e in episodes], dtype=np.float64)


def uniform_policy(action_space: gym.spaces.Box, seed: int) -> Act:
    """A uniform random policy over a bounded Box (its own seeded generator)."""
    rng = np.random.default_rng(seed)
    low, high = action_space.low, action_space.high

    def act(observations: np.ndarray) -> np.ndarray:
        return rng.uniform(low, high, size=(len(observations), *low.shape)).astype(np.float32)

    return act


def torch_policy(actor: torch.nn.Module, seed: int) -> Act:
    """A TorchRL actor (TensorDict in, ``action`` out) sampled stochastically from its own
    seeded random stream; the global torch RNG is left as it was after every call."""
    state: list[torch.Tensor | None] = [None]

    def act(observations: np.ndarray) -> np.ndarray:
        with torch.random.fork_rng(devices=[]):
            if state[0] is None:
                torch.manual_seed(seed)
            else:
                torch.set_rng_state(state[0])
            with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
                td = TensorDict(
                    observation=torch.as_tensor(observations, dtype=torch.float32),
                    batch_size=[len(observations)],
                )
                action = actor(td)["action"].numpy()
            state[0] = torch.get_rng_state()
        return action

    return act
