"""The behaviour-model protocol.

A behaviour model is an ``nn.Module`` that models pi_b(a | s) over actions in [-1, 1]^A.
It holds no optimiser, no EMA copy and no hidden step counter: the agent owns those.

Shapes: ``*B`` any leading batch dims, ``N`` samples per state, ``A`` action dim, ``O`` obs dim.

* ``per_sample_loss(action [*B, A], observation [*B, O]) -> [*B]``: the model's training loss
  per transition, NEVER averaged over the batch, so any weighting scheme applies to it.
* ``sample(observation [*B, O], num_samples=N) -> [*B, N, A]``: always stochastic; takes an
  optional ``torch.Generator``. It is differentiable unless the caller disables gradients
  (Diffusion-QL backpropagates through it; DIVO calls it under ``torch.no_grad()``).
* ``forward(observation [*B, O]) -> [*B, A]``: the policy view, one sample per state.

A new model plugs in by subclassing :class:`BehaviorModel` (or just implementing the three
methods) and accepting ``observation_dim`` and ``action_dim`` keyword arguments, which the
builder fills in from the dataset. Select it from the command line with
``behavior_model._target_=my_module.MyModel``.
"""

from __future__ import annotations

import abc

import torch
from tensordict.nn import TensorDictModule
from torch import nn


class BehaviorModel(nn.Module, abc.ABC):
    """Base class of behaviour models (see the module docstring for the contract)."""

    def __init__(self, observation_dim: int, action_dim: int) -> None:
        super().__init__()
        if observation_dim <= 0 or action_dim <= 0:
            raise ValueError(
                f"observation_dim and action_dim must be positive, got {observation_dim}, "
                f"{action_dim}"
            )
        self.observation_dim = int(observation_dim)
        self.action_dim = int(action_dim)

    @abc.abstractmethod
    def per_sample_loss(
        self,
        action: torch.Tensor,
        observation: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Training loss per transition: action [*B, A], observation [*B, O] -> [*B]."""

    @abc.abstractmethod
    def sample(
        self,
        observation: torch.Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw actions: observation [*B, O] -> [*B, N, A], each in [-1, 1]."""

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """Policy view: one sampled action per state, [*B, O] -> [*B, A]."""
        return self.sample(observation, num_samples=1).squeeze(-2)


def flatten_batch(x: torch.Tensor, event_dims: int = 1) -> tuple[torch.Tensor, torch.Size]:
    """Collapse the leading batch dims of ``x`` into one; return it and the batch shape."""
    batch_shape = x.shape[: x.dim() - event_dims]
    return x.reshape(-1, *x.shape[x.dim() - event_dims :]), batch_shape


def draw_indices(
    weights: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` indices drawn with replacement, index k with probability weights[k] / sum(weights)
    ([K] -> [n], long): the inverse CDF of one uniform draw each. Unlike ``torch.multinomial``
    it never checks its input on the host, so it neither syncs with a GPU nor breaks a CUDA
    graph, and it runs under ``torch.func.vmap``."""
    cdf = weights.cumsum(0)
    u = torch.rand(n, device=weights.device, dtype=weights.dtype, generator=generator) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=weights.shape[0] - 1)


def repeat_for_samples(
    observation: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Size]:
    """[*B, O] -> ([B' * N, O] with each state repeated N times in a row, batch shape *B).

    The usual first step of ``sample``; reshape the result with
    ``x.reshape(*batch_shape, num_samples, action_dim)``.
    """
    obs, batch_shape = flatten_batch(observation)
    return obs.repeat_interleave(num_samples, dim=0), batch_shape


def as_policy_module(
    model: nn.Module,
    in_key: str = "observation",
    out_key: str = "action",
) -> TensorDictModule:
    """TensorDict view of a behaviour model's policy: reads ``in_key``, writes ``out_key``."""
    return TensorDictModule(model, in_keys=[in_key], out_keys=[out_key])


def as_sampler_module(
    model: nn.Module,
    num_samples: int,
    in_key: str = "observation",
    out_key: str = "candidate_action",
) -> TensorDictModule:
    """TensorDict view that writes ``num_samples`` candidates per state to ``out_key``."""

    class _Sampler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, observation: torch.Tensor) -> torch.Tensor:
            return self.model.sample(observation, num_samples=num_samples)

    return TensorDictModule(_Sampler(), in_keys=[in_key], out_keys=[out_key])
