"""Target selectors: pick the action the actor's BC term pulls towards.

Protocol: ``forward(candidates [*B, N, A], candidate_advantage [*B, N, 1], action [*B, A],
action_advantage [*B, 1] | None) -> (target [*B, A], mask [*B, 1])``.

A selector never calls the critic or the behaviour model: candidates and their advantages
arrive precomputed, so each piece is testable alone. (The dataset action's advantage is an
argument beyond the three of the architecture sketch because ADPO's ``compare`` rule needs it.)
Class attributes tell the agent what to precompute: ``num_candidates`` (0 = no sampling) and
``needs_advantage``.
"""

from __future__ import annotations

import torch
from torch import nn

from divo.errors import ProtocolError, type_name

ADPO_RULES = ("compare", "positive")
ADPO_MASKS = ("plain", "three_level")
ADPO_CANDIDATES = ("sample", "policy_reconstruction")


class TargetSelector(nn.Module):
    """Base class of target selectors."""

    num_candidates: int = 0
    needs_advantage: bool = False
    # where candidates come from: behaviour-model samples (no gradient), or the behaviour
    # model's reconstruction of the actor's own action pi(s), with gradient (A2PR's code)
    candidate: str = "sample"

    def forward(
        self,
        candidates: torch.Tensor | None,
        candidate_advantage: torch.Tensor | None,
        action: torch.Tensor,
        action_advantage: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class DatasetSelector(TargetSelector):
    """Plain TD3+BC: the target is the dataset action, with mask 1."""

    def forward(self, candidates, candidate_advantage, action, action_advantage=None):
        return action, torch.ones_like(action[..., :1])


class ADPOSelector(TargetSelector):
    """DIVO's adaptive diffusion-based target (ADPO).

    The best-advantage candidate a_gen competes with the dataset action a:
      * ``compare`` (A2PR, default): target = a_gen if A(s, a_gen) >= A(s, a) else a;
      * ``positive``: target = a_gen if A(s, a_gen) > 0 else a.
    ``mask``: ``plain`` (1 everywhere) or A2PR's ``three_level``
    m = 1[A(s, a_gen) >= 0] + 1[A(s, a) > 0] (values 0, 1, 2), times ``mask_scale`` (A2PR's
    code: ``mask``, 0.5 in its runs).
    ``candidate``: ``sample`` (behaviour-model samples, as DIVO) or ``policy_reconstruction``
    (A2PR's code: the behaviour model's reconstruction of the actor's action pi(s), which keeps
    its gradient into the actor's BC term; one candidate per state). :meth:`select` is the
    selection with gradients through the chosen candidates; ``forward`` is it without.
    """

    needs_advantage = True

    def __init__(
        self,
        rule: str = "compare",
        mask: str = "plain",
        num_candidates: int = 1,
        mask_scale: float = 1.0,
        candidate: str = "sample",
    ):
        super().__init__()
        if rule not in ADPO_RULES:
            raise ValueError(f"ADPO rule must be one of {ADPO_RULES}, got {rule!r}")
        if mask not in ADPO_MASKS:
            raise ValueError(f"ADPO mask must be one of {ADPO_MASKS}, got {mask!r}")
        if num_candidates < 1:
            raise ValueError(f"ADPO needs num_candidates >= 1, got {num_candidates}")
        if mask_scale <= 0:
            raise ValueError(f"ADPO needs mask_scale > 0, got {mask_scale}")
        if candidate not in ADPO_CANDIDATES:
            raise ValueError(f"ADPO candidate must be one of {ADPO_CANDIDATES}, got {candidate!r}")
        if candidate == "policy_reconstruction" and num_candidates != 1:
            raise ValueError(
                "ADPO candidate=policy_reconstruction reconstructs one action per state; set "
                "selector.num_candidates=1"
            )
        self.rule = rule
        self.mask = mask
        self.num_candidates = num_candidates
        self.mask_scale = float(mask_scale)
        self.candidate = candidate

    @torch.no_grad()
    def forward(self, candidates, candidate_advantage, action, action_advantage=None):
        return self.select(candidates, candidate_advantage, action, action_advantage)

    def select(
        self,
        candidates: torch.Tensor,
        candidate_advantage: torch.Tensor,
        action: torch.Tensor,
        action_advantage: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``forward``, differentiable in ``candidates`` (the target is the chosen candidate
        itself where it wins); the advantages only choose. Shapes as the protocol."""
        if candidates is None or candidate_advantage is None:
            raise ValueError("ADPO needs candidate actions and their advantages")
        candidate_advantage = candidate_advantage.detach()
        if action_advantage is not None:
            action_advantage = action_advantage.detach()
        best = candidate_advantage.argmax(dim=-2, keepdim=True)  # [*B, 1, 1]
        a_gen = candidates.gather(-2, best.expand(*best.shape[:-1], candidates.shape[-1]))
        a_gen = a_gen.squeeze(-2)
        adv_gen = candidate_advantage.gather(-2, best).squeeze(-2)  # [*B, 1]
        if self.rule == "compare" or self.mask == "three_level":
            if action_advantage is None:
                raise ValueError(
                    f"ADPO rule {self.rule!r} / mask {self.mask!r} needs the dataset action's "
                    "advantage"
                )
        if self.rule == "compare":
            use_gen = adv_gen >= action_advantage
        else:
            use_gen = adv_gen > 0
        target = torch.where(use_gen, a_gen, action)
        if self.mask == "plain":
            mask = torch.ones_like(adv_gen)
        else:
            mask = (adv_gen >= 0).to(action.dtype) + (action_advantage > 0).to(action.dtype)
        return target, mask * self.mask_scale


def resample_index(
    scores: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one of N candidates per row: scores [*B, N] -> index [*B] (long).

    ``temperature`` > 0 draws i with probability softmax(scores / temperature)_i; 0 takes the
    argmax (greedy). The draw is the Gumbel-max trick, argmax_i(scores_i / temperature + G_i)
    with G_i standard Gumbel: the same distribution as ``torch.multinomial`` of the softmax,
    without its check of the probabilities on the host (a device sync per call on a GPU, which
    a CUDA graph cannot capture).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return scores.argmax(dim=-1)
    u = torch.rand(scores.shape, device=scores.device, dtype=scores.dtype, generator=generator)
    gumbel = -torch.log(-torch.log(u))  # u = 0 gives -inf: that candidate is never drawn
    return (scores / temperature + gumbel).argmax(dim=-1)


def gather_candidate(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """candidates [*B, N, A], index [*B] -> the chosen candidates [*B, A]."""
    idx = index[..., None, None].expand(*index.shape, 1, candidates.shape[-1])
    return candidates.gather(-2, idx).squeeze(-2)


class ResamplingSelector(TargetSelector):
    """IDQL / SfBC-style target: one of N behaviour-model candidates, drawn by advantage.

    target = candidate i with probability softmax(A(s, a_i) / temperature), or the best-advantage
    candidate at temperature 0; mask 1. The dataset action never competes (unlike ADPO), so the
    actor is pulled towards an advantage-reweighted sample of the behaviour model.
    """

    needs_advantage = True

    def __init__(self, num_candidates: int = 32, temperature: float = 1.0) -> None:
        super().__init__()
        if num_candidates < 1:
            raise ValueError(f"resampling needs num_candidates >= 1, got {num_candidates}")
        if temperature < 0:
            raise ValueError(f"resampling temperature must be >= 0, got {temperature}")
        self.num_candidates = num_candidates
        self.temperature = temperature

    @torch.no_grad()
    def forward(
        self,
        candidates,
        candidate_advantage,
        action,
        action_advantage=None,
        generator: torch.Generator | None = None,
    ):
        if candidates is None or candidate_advantage is None:
            raise ValueError("resampling needs candidate actions and their advantages")
        index = resample_index(candidate_advantage.squeeze(-1), self.temperature, generator)
        return gather_candidate(candidates, index), torch.ones_like(action[..., :1])


Q_HEADS = ("q1", "min")


class ResamplingPolicy(nn.Module):
    """An evaluation-time action picker: raw observation -> action.

    Normalise the observation, draw ``num_samples`` candidates from a generative policy or
    behaviour model, score them with the critic, return one drawn by softmax(Q / temperature)
    (argmax at temperature 0). Used as IDQL's policy (resampling over the behaviour model) and as
    Diffusion-QL's evaluation policy (50 samples, softmax(Q) over min(Q1, Q2)). Softmax over Q
    equals softmax over A = Q - V for one state, so no value network is needed.

    Saved like any policy: its ``state_dict`` (normaliser statistics, model, critic) plus a Hydra
    config of this class rebuild it with no training code.
    """

    def __init__(
        self,
        normalizer: nn.Module,
        behavior_model: nn.Module,
        critic: nn.Module,
        num_samples: int = 50,
        temperature: float = 1.0,
        q_head: str = "min",
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if q_head not in Q_HEADS:
            raise ValueError(f"q_head must be one of {Q_HEADS}, got {q_head!r}")
        self.normalizer = normalizer
        self.behavior_model = behavior_model
        self.critic = critic
        self.num_samples = num_samples
        self.temperature = temperature
        self.q_head = q_head

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """[*B, O] raw observations -> [*B, A] actions."""
        obs = self.normalizer(observation)
        candidates = self.behavior_model.sample(obs, self.num_samples)  # [*B, N, A]
        q = self.critic(obs.unsqueeze(-2).expand(*candidates.shape[:-1], -1), candidates)
        q = q[0] if self.q_head == "q1" else q.min(dim=0).values  # [*B, N, 1]
        return gather_candidate(candidates, resample_index(q.squeeze(-1), self.temperature))


class BehaviorModePolicy(nn.Module):
    """A behaviour model deployed as the policy through its most likely action: raw observation
    -> normaliser -> ``behavior_model.mode`` -> action (IQL deploys its Gaussian's mean)."""

    needs_critic = False  # the builder passes no critic

    def __init__(self, normalizer: nn.Module, behavior_model: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(behavior_model, "mode", None)):
            raise ValueError(
                f"{type(behavior_model).__name__} has no mode(observation) to deploy; use a "
                "behaviour model with one (behavior_model=gaussian) or another evaluation_policy"
            )
        self.normalizer = normalizer
        self.behavior_model = behavior_model

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """[*B, O] raw observations -> [*B, A] actions."""
        return self.behavior_model.mode(self.normalizer(observation))


IMPLICIT_WEIGHT_FORMS = ("expectile", "quantile")


def implicit_policy_weights(
    advantage: torch.Tensor, tau: float, form: str = "expectile", eps: float = 1e-6
) -> torch.Tensor:
    """IDQL's weights of behaviour samples (Hansen-Estruch et al. 2023): the implicit policy of
    a value V fitted to Q with the loss f(Q - V) weighs an action by w = f'(A) / A, A = Q - V.

    ``form="expectile"``: V is an expectile of Q, f(u) = |tau - 1[u < 0]| u^2, so
    w = |tau - 1[A < 0]| (IDQL's code, ``sample_implicit_policy``, for its expectile critic);
    ``form="quantile"``: V is a quantile of Q, f(u) = |tau - 1[u < 0]| |u|, so
    w = |tau - 1[A < 0]| / |A| (|A| floored at ``eps``).
    advantage [*B, N] -> unnormalised weights [*B, N]."""
    if form not in IMPLICIT_WEIGHT_FORMS:
        raise ValueError(
            f"form={form!r} is not an implicit-policy weight; choose one of "
            f"{', '.join(IMPLICIT_WEIGHT_FORMS)}"
        )
    w = torch.where(advantage < 0, 1.0 - tau, tau).to(advantage.dtype)
    if form == "quantile":
        w = w / advantage.abs().clamp_min(eps)
    return w


def expectile_importance_weights(
    advantage: torch.Tensor, expectile: float, divide_by_advantage: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """The older spelling of :func:`implicit_policy_weights`: ``divide_by_advantage=True`` is
    its ``quantile`` form, ``False`` its ``expectile`` form."""
    form = "quantile" if divide_by_advantage else "expectile"
    return implicit_policy_weights(advantage, expectile, form, eps)


class ExpectileResamplingPolicy(nn.Module):
    """IDQL's deployed policy: raw observation -> normaliser -> ``num_samples`` behaviour-model
    candidates -> one of them, chosen by A = min(Q1, Q2)(s, a) - V(s) from the critic V is fitted
    to and V itself. Saved whole (normaliser, behaviour model, critic, value).

    ``selection``:
      ``expectile`` (default): drawn with probability proportional to |tau - 1[A < 0]|, the
      implicit policy of an expectile V (the V IDQL's recipe trains; IDQL's code's
      ``sample_implicit_policy``), :func:`implicit_policy_weights`;
      ``quantile``: proportional to |tau - 1[A < 0]| / |A|, the implicit policy of a quantile
      V (with an expectile V, a mismatch: it favours the candidates with A nearest 0);
      ``argmax``: the candidate of largest min Q (IDQL's code's ``eval_actions``, what its
      ``evaluate`` deploys; V does not change the choice).
    Older spellings, kept so policies saved before them load as they were: ``importance`` (the
    name this form had) is ``quantile``; ``divide_by_advantage`` true is ``quantile``, false
    ``expectile``.
    """

    needs_value = True  # the builder passes the value network
    SELECTIONS = ("expectile", "quantile", "argmax")
    ALIASES = {"importance": "quantile"}

    def __init__(
        self,
        normalizer: nn.Module,
        behavior_model: nn.Module,
        critic: nn.Module,
        value: nn.Module,
        expectile: float = 0.7,
        num_samples: int = 64,
        selection: str = "expectile",
        divide_by_advantage: bool | None = None,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0.0 < expectile < 1.0:
            raise ValueError(f"expectile must be in (0, 1), got {expectile}")
        if divide_by_advantage is not None:
            selection = "quantile" if divide_by_advantage else "expectile"
        selection = self.ALIASES.get(selection, selection)
        if selection not in self.SELECTIONS:
            raise ValueError(
                f"selection={selection!r} is not an IDQL selection; choose one of "
                f"{', '.join(self.SELECTIONS)}"
            )
        self.normalizer = normalizer
        self.behavior_model = behavior_model
        self.critic = critic
        self.value = value
        self.expectile = float(expectile)
        self.num_samples = int(num_samples)
        self.selection = selection

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """[*B, O] raw observations -> [*B, A] actions."""
        obs = self.normalizer(observation)
        candidates = self.behavior_model.sample(obs, self.num_samples)  # [*B, N, A]
        expanded = obs.unsqueeze(-2).expand(*candidates.shape[:-1], -1)
        q = self.critic(expanded, candidates).min(dim=0).values.squeeze(-1)  # [*B, N]
        if self.selection == "argmax":
            return gather_candidate(candidates, q.argmax(dim=-1))
        adv = q - self.value(obs)  # V(s) [*B, 1] broadcasts over the N candidates
        w = implicit_policy_weights(adv, self.expectile, self.selection)
        # draw i with probability w_i / sum w: resampling at temperature 1 on log w
        return gather_candidate(candidates, resample_index(w.log(), 1.0))


def check_selector(selector: object, action_dim: int) -> None:
    """Check a target selector against the protocol on a probe batch; raise
    :class:`divo.errors.ProtocolError` naming the first thing wrong: the ``num_candidates``
    (int >= 0) and ``needs_advantage`` attributes (subclass :class:`TargetSelector`), and
    ``(target [2, A], mask [2, 1])`` back, finite, ``mask >= 0`` and targets in [-1, 1] when
    the candidates and actions are."""
    name = type_name(selector)
    n = getattr(selector, "num_candidates", None)
    needs = getattr(selector, "needs_advantage", None)
    if (
        not callable(selector)
        or not isinstance(n, int)
        or isinstance(n, bool)
        or n < 0
        or not isinstance(needs, bool)
    ):
        raise ProtocolError(
            f"target selector {name} must be callable and say what the agent precomputes for "
            f"it: num_candidates (int >= 0; got {n!r}) and needs_advantage (bool; got "
            f"{needs!r}); subclass divo.objectives.TargetSelector"
        )
    generator = torch.Generator().manual_seed(0)
    action = torch.rand(2, action_dim, generator=generator) * 2 - 1
    candidates = cand_adv = None
    if n:
        candidates = torch.rand(2, n, action_dim, generator=generator) * 2 - 1
        cand_adv = torch.randn(2, n, 1, generator=generator) if needs else None
    act_adv = torch.randn(2, 1, generator=generator) if needs else None
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # the probe leaves no trace
            out = selector(candidates, cand_adv, action, act_adv)
    except Exception as exc:
        raise ProtocolError(
            f"target selector {name} failed on a probe batch (candidates [2, {n}, "
            f"{action_dim}], action [2, {action_dim}]): {type(exc).__name__}: {exc}"
        ) from exc
    shapes = (
        tuple(tuple(t.shape) for t in out)
        if isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out)
        else type(out).__name__
    )
    if shapes != ((2, action_dim), (2, 1)):
        raise ProtocolError(
            f"target selector {name} returned {shapes} for 2 states; it must return "
            f"(target [2, {action_dim}], mask [2, 1])"
        )
    target, mask = out
    if not bool(torch.isfinite(mask).all()) or bool((mask < 0).any()):
        raise ProtocolError(
            f"target selector {name} returned the BC mask {mask.flatten().tolist()}; masks must "
            "be finite and >= 0"
        )
    if not bool(torch.isfinite(target).all()) or bool((target.abs() > 1.0).any()):
        raise ProtocolError(
            f"target selector {name} returned targets {target.flatten().tolist()} from "
            f"candidates and actions in [-1, 1]; targets are actions in the normalised [-1, 1] "
            "space the actor's tanh reaches (clamp them to [-1, 1])"
        )
