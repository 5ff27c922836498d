"""DIVO trained by a TorchRL script: a TensorDictReplayBuffer filled from a Minari dataset,
DIVO's LossModule, one Adam per network, SoftUpdate for the targets, and TorchRL rollouts of
the dataset's evaluation environment.

    python examples/torchrl_divo.py --steps 10000   # divo's built-in Hopper data, no download
"""

from __future__ import annotations

import argparse

import torch
from tensordict.nn import TensorDictModule
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs import DoubleToFloat, GymWrapper, TransformedEnv
from torchrl.objectives import SoftUpdate

import divo
from divo.agents.builder import build_agent
from divo.agents.evaluate import normalized_score
from divo.objectives.losses import DIVOLoss


def make_loss(data, recipe: str = "divo", overrides=()):
    """DIVO's LossModule over the networks a recipe names (those `divo train` would build)."""
    cfg = divo.compose(recipe, overrides)
    sizes = {"observation_dim": data.observation_dim, "action_dim": data.action_dim}
    agent = build_agent(cfg, **sizes, obs_mean=data.obs_mean, obs_std=data.obs_std)
    return DIVOLoss.from_agent(agent), agent, cfg


def make_optimizers(loss_module, cfg) -> dict:
    """One Adam per stage's network (critic, value, behavior, actor) at the recipe's rate."""
    return {
        name: torch.optim.Adam(net.parameters(), lr=cfg[name].lr)
        for name, net in loss_module.networks().items()
    }


def update(loss_module, optimizers, target_updater, batch, step, generator=None) -> dict:
    """One DIVO update: each stage's loss steps its own optimiser, in DIVO's order (critic,
    value, behaviour model, then every policy_delay updates the actor and the targets)."""
    metrics = {}
    for name, losses in loss_module.stages(batch, step, generator):
        optimizers[name].zero_grad()
        losses[f"loss_{name}"].backward()
        optimizers[name].step()
        metrics.update({k: v.detach() for k, v in losses.items()})  # no host sync here
    loss_module.update_behavior_ema()  # no-op unless the recipe keeps a moving average
    if loss_module.updates_targets(step):
        target_updater.step()
    return metrics


def evaluate(policy, make_env, episodes: int, max_steps: int, seed: int) -> list[float]:
    """Episode returns of the deterministic policy, from TorchRL rollouts of the dataset's
    evaluation environment as divo makes it (``data.make_env``: the stored spec with its
    wrappers, e.g. the action rescaling or the flattened observations the data were loaded
    with; a bare ``GymEnv(id)`` would drop them)."""
    env = TransformedEnv(GymWrapper(make_env()), DoubleToFloat())
    env.set_seed(seed)
    actor = TensorDictModule(policy, in_keys=["observation"], out_keys=["action"])
    with torch.no_grad():
        rollouts = [env.rollout(max_steps, actor) for _ in range(episodes)]
    env.close()
    return [r["next", "reward"].sum().item() for r in rollouts]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="divo/hopper/medium-replay-v0")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--max-episode-steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    # the recipe on this dataset: its per-dataset settings, and its data as `divo train` reads
    # them (the reward transform included; .data is the TED TensorDict)
    on_data = [f"dataset.id={args.dataset}"]
    data = divo.load_offline_data(divo.compose("divo", on_data))
    buffer = TensorDictReplayBuffer(
        storage=LazyTensorStorage(data.num_transitions), batch_size=args.batch_size
    )
    buffer.extend(data.data)

    loss_module, agent, cfg = make_loss(data, "divo", on_data)
    optimizers = make_optimizers(loss_module, cfg)
    target_updater = SoftUpdate(loss_module, tau=cfg.critic.tau)
    for step in range(args.steps):
        metrics = update(loss_module, optimizers, target_updater, buffer.sample(), step)
        if step % 1000 == 0 or step == args.steps - 1:
            print(f"step {step}: " + ", ".join(f"{k} {v.item():.3g}" for k, v in metrics.items()))

    if not data.can_evaluate:
        print("the dataset names no environment that can be made here: no evaluation")
        return {"returns": [], "normalized_score": None, "metrics": metrics}
    returns = evaluate(
        agent.policy, data.make_env, args.eval_episodes, args.max_episode_steps, args.seed
    )
    mean = sum(returns) / len(returns)
    score = normalized_score(mean, data.ref_min_score, data.ref_max_score)
    shown = f"normalised score {score:.1f}" if score is not None else "no reference scores"
    print(f"mean return {mean:.1f} over {len(returns)} episodes, {shown}")
    return {"returns": returns, "normalized_score": score, "metrics": metrics}


if __name__ == "__main__":
    main()
