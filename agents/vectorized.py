"""N independent seeds of one recipe trained as one agent with stacked weights.

Every parameter and buffer of the N agents is stacked along a leading seed dimension (a
:class:`tensordict.TensorDict` of ``[N, ...]`` tensors). :class:`VectorizedStages` runs each stage
of :meth:`OfflineAgent.run_update` through ``torch.func.vmap(..., randomness="different")`` with
seed ``i``'s slice swapped into one template :class:`OfflineAgent` (``params.to_module``): one
batched call per stage for all seeds, each seed drawing its own random numbers.

Gradients: the stage's loss is summed over seeds and backpropagated once. Seeds share no
parameters, so each seed's slice receives exactly its own gradient. One Adam per part over the
stacked tensors is N independent Adams (Adam is element-wise, and every seed has taken the same
number of steps). Polyak updates act on the stacked target/online tensors. Metrics come back per
seed, shape ``[N]``.

Checkpoints and policies are per seed: :meth:`VectorizedAgent.seed_agent` writes seed ``i``'s
slice (parameters, buffers, optimiser states) into the template agent and returns it, so a seed's
checkpoint and ``policy.pt`` are exactly those of a single run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from omegaconf import DictConfig
from tensordict import TensorDict, TensorDictBase

from divo.agents.agent import OfflineAgent, Stages, split_loss
from divo.errors import ConfigError

MULTIRUN_HINT = "use train.num_seeds=1 (or a multirun: `divo train <recipe> -m seed=0,1,2`)"


class VectorizedStages(Stages):
    """Runs each stage vmapped over the seeds of a :class:`VectorizedAgent`."""

    def __init__(self, vec: VectorizedAgent) -> None:
        self.vec = vec

    def run(self, stage, optimizer, *args, generator=None) -> dict[str, torch.Tensor]:
        if generator is not None:
            raise ConfigError(f"vectorised seeds draw from the global generator; {MULTIRUN_HINT}")
        vec = self.vec
        agent = vec.agent

        def call(state: TensorDictBase, *stage_args):
            with state.to_module(agent):
                return stage(*stage_args)

        try:
            out = torch.func.vmap(call, randomness="different")(vec.state, *args)
        except RuntimeError as exc:
            text = str(exc)
            if "vmap" not in text.lower() and "batch" not in text.lower():
                raise
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise ConfigError(
                f"train.num_seeds={vec.num_seeds}: {stage.__name__} of recipe "
                f"{vec.recipe!r} cannot run under torch.func.vmap ({first}); {MULTIRUN_HINT}"
            ) from exc
        loss, out = split_loss(out)
        if optimizer is not None:
            opt = vec.optimizers[optimizer]
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()  # seeds share nothing: each slice gets its own gradient
            opt.step()
        return out

    def polyak(self, target, online, tau: float) -> None:
        names = self.vec._name_of
        flat = self.vec.tensors
        super().polyak(
            [flat[names[id(t)]] for t in target], [flat[names[id(o)]] for o in online], tau
        )


class VectorizedAgent:
    """N :class:`OfflineAgent` s of the same recipe, trained together with stacked weights.

    Args:
        agents: N agents built from the same recipe (same parts and sizes), e.g. by
            :func:`build_vectorized_agent`. Their current parameters, buffers and optimiser
            settings become the N slices; ``agents[0]`` is kept as the template the stages run in.
        recipe: the recipe's name, for error messages.

    ``update(batch)`` takes a ``[N, B]`` batch (seed ``i`` trains on ``batch[i]``) and returns
    per-seed metrics ``[N]``.
    """

    def __init__(self, agents: Sequence[OfflineAgent], recipe: str | None = None) -> None:
        if not agents:
            raise ValueError("VectorizedAgent needs at least one agent")
        for a in agents:
            if not isinstance(a, OfflineAgent):
                raise ConfigError(
                    f"train.num_seeds > 1 stacks OfflineAgent recipes; recipe {recipe!r} builds "
                    f"{type(a).__name__}: {MULTIRUN_HINT}"
                )
        self.recipe = recipe
        self.num_seeds = len(agents)
        self.agent = agents[0]
        template = self.agent
        names = [n for n, _ in template.named_parameters()]
        buffer_names = [n for n, _ in template.named_buffers()]
        self._trainable = {n for n, p in template.named_parameters() if p.requires_grad}
        self._template_tensors: dict[str, torch.Tensor] = {
            **dict(template.named_parameters()),
            **dict(template.named_buffers()),
        }
        self._name_of = {id(t): n for n, t in self._template_tensors.items()}
        sources = [{**dict(a.named_parameters()), **dict(a.named_buffers())} for a in agents]
        for src in sources:
            if list(src) != names + buffer_names or any(
                src[n].shape != t.shape for n, t in self._template_tensors.items()
            ):
                raise ValueError("the agents to stack must be built from the same recipe and sizes")
        flat = {}
        for name in names + buffer_names:
            stacked = torch.stack([src[name].detach() for src in sources]).clone()
            flat[name] = stacked.requires_grad_(name in self._trainable)
        # the TensorDict holds the very tensors of ``self.tensors`` (optimisers step them in place)
        self.state: TensorDictBase = TensorDict(flat, batch_size=[self.num_seeds]).unflatten_keys(
            "."
        )
        self.tensors: dict[str, torch.Tensor] = flat
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._opt_names: dict[str, list[str]] = {}
        for part, opt in template.optimizers.items():
            if len(opt.param_groups) != 1:
                raise ConfigError(
                    f"optimiser {part!r} has several parameter groups; {MULTIRUN_HINT}"
                )
            group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
            part_names = [self._name_of[id(p)] for p in opt.param_groups[0]["params"]]
            self._opt_names[part] = part_names
            self.optimizers[part] = type(opt)([flat[n] for n in part_names], **group)
        self.stages = VectorizedStages(self)
        for i, a in enumerate(agents):  # optimiser states already present (e.g. loaded ones)
            if any(o.state for o in a.optimizers.values()):
                self._read_optimizers(a, i)

    # ------------------------------------------------------------------ training
    @property
    def num_updates(self) -> int:
        return self.agent.num_updates

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self.agent.num_updates = int(value)

    @property
    def policy_delay(self) -> int:
        return self.agent.policy_delay

    def update(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """One training step of every seed on a ``[N, B]`` batch; per-seed metrics ``[N]``."""
        if batch.batch_dims != 2 or batch.batch_size[0] != self.num_seeds:
            raise ValueError(
                f"a vectorised update needs a [{self.num_seeds}, B] batch, got {batch.batch_size}"
            )
        return self.agent.run_update(batch, self.stages)

    def train(self, mode: bool = True) -> VectorizedAgent:
        self.agent.train(mode)
        return self

    def non_finite_seeds(self) -> list[int]:
        """Seeds (indices) whose parameters hold NaN/inf (one device sync)."""
        bad = torch.zeros(self.num_seeds, dtype=torch.bool, device=self._device())
        for t in self.tensors.values():
            if t.is_floating_point():
                bad |= ~torch.isfinite(t.detach()).flatten(1).all(1)
        return [i for i, b in enumerate(bad.tolist()) if b]

    def _device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    # ------------------------------------------------------------------ per-seed views
    @torch.no_grad()
    def seed_agent(self, index: int) -> OfflineAgent:
        """The template agent holding seed ``index``'s parameters, buffers, optimiser states and
        step counter: take its ``policy``, ``training_state()`` or checkpoint it. It is shared by
        all seeds: valid until the next ``seed_agent`` call or update."""
        for name, t in self.tensors.items():
            self._template_tensors[name].copy_(t[index])
        agent = self.agent
        for part, opt in self.optimizers.items():
            single = agent.optimizers[part]
            single.state.clear()
            for p_single, name in zip(_params(single), self._opt_names[part], strict=True):
                stacked = self.tensors[name]
                state = opt.state.get(stacked)
                if state:
                    single.state[p_single] = {
                        k: v[index].clone() if _per_seed(v, stacked) else v.clone()
                        for k, v in state.items()
                    }
        return agent

    def policy(self, index: int) -> torch.nn.Module:
        """Seed ``index``'s deployable policy (a module over the shared template: use it before
        the next ``seed_agent``/``policy`` call)."""
        return self.seed_agent(index).policy

    def training_state(self, index: int) -> dict:
        """Seed ``index``'s training state, in the format of ``OfflineAgent.training_state``."""
        return copy.deepcopy(self.seed_agent(index).training_state())

    def load_training_state(self, index: int, state: Mapping) -> None:
        """Load a single agent's training state (e.g. a checkpoint of a single run) into seed
        ``index``. Every seed must end up at the same ``num_updates``."""
        agent = self.agent
        agent.load_training_state(state)
        with torch.no_grad():
            for name, t in self.tensors.items():
                t[index].copy_(self._template_tensors[name])
        self._read_optimizers(agent, index)

    @torch.no_grad()
    def _read_optimizers(self, agent: OfflineAgent, index: int) -> None:
        for part, opt in self.optimizers.items():
            single = agent.optimizers[part]
            for p_single, name in zip(_params(single), self._opt_names[part], strict=True):
                stacked = self.tensors[name]
                state = single.state.get(p_single)
                if not state:
                    opt.state.pop(stacked, None)
                    continue
                target = opt.state.setdefault(stacked, {})
                for k, v in state.items():
                    if torch.is_tensor(v) and v.shape == stacked.shape[1:] and v.dim() > 0:
                        if k not in target:
                            target[k] = torch.zeros_like(stacked)
                        target[k][index].copy_(v)
                    else:  # the step count: the same for every seed
                        target[k] = v.clone() if torch.is_tensor(v) else v
        self.agent.num_updates = agent.num_updates


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return opt.param_groups[0]["params"]


def _per_seed(value, stacked: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == stacked.shape


def build_vectorized_agent(
    cfg: DictConfig,
    seeds: Sequence[int],
    *,
    observation_dim: int,
    action_dim: int,
    obs_mean: torch.Tensor,
    obs_std: torch.Tensor,
    device: torch.device | str = "cpu",
    before_build: Callable[[int], None] | None = None,
) -> VectorizedAgent:
    """Build one agent per seed with ``build_agent`` after ``before_build(seed)`` (default
    ``torch.manual_seed(seed)``), so seed ``i``'s initial weights are those of a single build
    with that seed, and stack them."""
    from divo.agents.builder import build_agent

    if (cfg.get("algorithm") or "offline") != "offline":
        raise ConfigError(
            f"train.num_seeds > 1 vectorises OfflineAgent recipes; recipe {cfg.get('recipe')!r} "
            f"(algorithm={cfg.get('algorithm')}) is not one: {MULTIRUN_HINT}"
        )
    agents = []
    for seed in seeds:
        if before_build is None:
            torch.manual_seed(int(seed))
        else:
            before_build(int(seed))
        agents.append(
            build_agent(
                cfg,
                observation_dim=observation_dim,
                action_dim=action_dim,
                obs_mean=obs_mean,
                obs_std=obs_std,
                device=device,
            )
        )
    return VectorizedAgent(agents, recipe=cfg.get("recipe"))
