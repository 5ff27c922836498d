"""The behaviour-model protocol.

A behaviour model is an ``nn.Module`` that models pi_b(a | s) over actions in [-1, 1]^A.
It holds no optimiser, no EMA copy and no hidden step counter: the agent owns those.

Shapes: ``*B`` any leading batch dims, ``N`` samples per state, ``A`` action dim, ``O`` obs dim.

* ``per_sample_loss(action [*B, A], observation [*B, O], generator=None) -> [*B]``: the
  model's training loss per transition, NEVER averaged over the batch, so any weighting scheme
  applies to it; ``generator`` (a ``torch.Generator`` or None) is for its random draws.
* ``sample(observation [*B, O], num_samples=N, generator=None) -> [*B, N, A]``: always
  stochastic. It is differentiable unless the caller disables gradients
  (Diffusion-QL backpropagates through it; DIVO calls it under ``torch.no_grad()``).
* ``forward(observation [*B, O]) -> [*B, A]``: the policy view, one sample per state.
* optional ``loss_terms(action, observation, generator=None) -> (weighted [*B], unweighted
  [*B] | None)``: the per-sample loss split into the part a weighting scheme weights and a part
  it leaves alone (the CVAE's KL term under A2PR's code); the default is
  ``(per_sample_loss(...), None)``.

A new model plugs in by subclassing :class:`BehaviorModel` (or just implementing the three
methods) and accepting ``observation_dim`` and ``action_dim`` keyword arguments, which the
builder fills in from the dataset. Select it from the command line with
``behavior_model._target_=my_module.MyModel``. The builder checks every model it builds with
:func:`check_behavior_model` (methods, the ``generator`` keyword, output shapes on a probe batch)
and stops with one line naming what is wrong.
"""

from __future__ import annotations

import abc
import inspect

import torch
from tensordict.nn import TensorDictModule
from torch import nn

from divo.errors import ProtocolError, type_name


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

    def loss_terms(
        self,
        action: torch.Tensor,
        observation: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the per-sample loss a weighting scheme weights [*B], an unweighted part or None)."""
        return self.per_sample_loss(action, observation, generator=generator), None

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """Policy view: one sampled action per state, [*B, O] -> [*B, A]."""
        return self.sample(observation, num_samples=1).squeeze(-2)


class BehaviorModelError(ProtocolError):
    """A behaviour model that does not follow the protocol (see the module docstring)."""


def _accepts_generator(method) -> bool:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a C function...): trust it
        return True
    return any(p.name == "generator" or p.kind is p.VAR_KEYWORD for p in params)


def check_behavior_model(model: object, observation_dim: int, action_dim: int) -> None:
    """Check ``model`` against the protocol on a probe batch; raise :class:`BehaviorModelError`
    naming the first thing wrong.

    Checks: an ``nn.Module`` with ``per_sample_loss`` and ``sample`` that take a ``generator``
    keyword; ``per_sample_loss`` of 2 transitions returns 2 losses (not their mean), in
    float32 and, for a model with trainable parameters, in the autograd graph;
    ``sample`` of 2 states and 3 samples returns ``[2, 3, A]``. The probe runs without
    gradients, in eval mode, on the model's device, and leaves no trace: the global random
    state, the module's training flags and its parameters are as before.
    """
    name = type_name(model)
    guide = "see docs/plugin_guide.md"
    if not isinstance(model, nn.Module):
        raise BehaviorModelError(f"behaviour model {name} is not a torch.nn.Module; {guide}")
    for method in ("per_sample_loss", "sample"):
        if not callable(getattr(model, method, None)):
            raise BehaviorModelError(
                f"behaviour model {name} has no {method}() method; the protocol needs "
                f"per_sample_loss(action, observation, generator=None) and sample(observation, "
                f"num_samples=1, generator=None); {guide}"
            )
        if not _accepts_generator(getattr(model, method)):
            raise BehaviorModelError(
                f"behaviour model {name}: {method}() takes no generator keyword; add "
                f"generator=None (the agent passes its torch.Generator for the random draws); "
                f"{guide}"
            )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    batch = 2
    flags = {module: module.training for module in model.modules()}
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        # two different transitions: a loss averaged over the batch shows as one value twice
        probe = torch.Generator().manual_seed(0)
        observation = torch.randn(batch, observation_dim, generator=probe).to(device)
        action = (torch.rand(batch, action_dim, generator=probe) * 1.6 - 0.8).to(device)
        try:
            loss = model.per_sample_loss(action, observation, generator=None)
            samples = model.sample(observation, num_samples=3, generator=None)
        except Exception as exc:
            raise BehaviorModelError(
                f"behaviour model {name} failed on a probe batch (action [{batch}, {action_dim}], "
                f"observation [{batch}, {observation_dim}]): {type(exc).__name__}: {exc}"
            ) from exc
        trainable = any(p.requires_grad for p in model.parameters())
        if trainable and isinstance(loss, torch.Tensor):
            # the same loss with gradients on: it must reach the parameters, or the model
            # never trains (the optimiser's backward fails later with torch's own message)
            model.eval()
            try:
                with torch.enable_grad():
                    tracked = model.per_sample_loss(action, observation, generator=None)
            finally:
                for module, training in flags.items():
                    module.train(training)
            if isinstance(tracked, torch.Tensor) and not tracked.requires_grad:
                raise BehaviorModelError(
                    f"behaviour model {name}: per_sample_loss returned a tensor detached from "
                    f"the model's parameters (a .detach(), .item(), numpy round trip or "
                    f"torch.no_grad() inside it?); the weighted loss could not train the "
                    f"model. Keep the loss in torch and in the autograd graph; {guide}"
                )
    if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != (batch,):
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise BehaviorModelError(
            f"behaviour model {name}: per_sample_loss of {batch} transitions returned {got}, "
            f"not shape ({batch},); return one loss per transition, never averaged over the "
            f"batch (the weighting scheme multiplies each); {guide}"
        )
    if loss.dtype != torch.float32 and loss.is_floating_point():
        raise BehaviorModelError(
            f"behaviour model {name}: per_sample_loss returned {loss.dtype}; divo trains in "
            f"float32 (cast the model's parameters or outputs); {guide}"
        )
    if bool(loss[0] == loss[1]):
        raise BehaviorModelError(
            f"behaviour model {name}: per_sample_loss gave two different transitions the same "
            f"loss ({float(loss[0]):g}): a loss averaged over the batch and expanded? Return "
            f"each transition's own loss (the weighting scheme multiplies each); {guide}"
        )
    if not isinstance(samples, torch.Tensor) or tuple(samples.shape) != (batch, 3, action_dim):
        got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise BehaviorModelError(
            f"behaviour model {name}: sample(observation [{batch}, {observation_dim}], "
            f"num_samples=3) returned {got}, not ({batch}, 3, {action_dim}); {guide}"
        )


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
