"""Consistency model of the behaviour policy, trained directly from data (consistency training).

A consistency function f(x, sigma, s) maps a noisy action x = a + sigma * z at ANY noise level
back to a clean action, so one network call turns pure noise into a sample (Song et al. 2023,
"Consistency Models"). It is trained without a pre-trained diffusion model by *consistency
training* in its improved form (Song & Dhariwal 2023, "Improved techniques for training
consistency models", iCT):

* EDM parameterisation with the boundary condition f(x, sigma_min) = x:
  f = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), s), where
  c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = sd (sigma - sigma_min) / sqrt(sigma^2 +
  sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = time_scale * ln(sigma), sd = sigma_data.
* Karras noise levels sigma_1 < ... < sigma_N (exponent rho) and the loss, for an adjacent pair
  (sigma_i, sigma_{i+1}) and ONE shared noise draw z,
  l(s, a) = lambda_i * d(f(a + sigma_{i+1} z, sigma_{i+1}, s), sg[f(a + sigma_i z, sigma_i, s)]),
  with the pseudo-Huber distance d(x, y) = sqrt(||x - y||^2 + c^2) - c, the weight lambda_i =
  1 / (sigma_{i+1} - sigma_i), i drawn from iCT's discretised log-normal (or uniformly), and the
  teacher sg[.] the SAME network under stop-gradient: iCT drops the EMA teacher, so the model
  holds no EMA (as the behaviour-model protocol asks).
* A noise curriculum: N grows from ``curriculum_start + 1`` to ``curriculum_end + 1`` by doubling
  (iCT's exponential schedule) over ``curriculum_steps`` training steps.

**Who owns the curriculum.** The protocol keeps ``per_sample_loss(action, observation)`` free of a
step argument and forbids hidden step counters. The current number of noise levels N therefore
is the attribute ``num_noise_levels``, which is *training state*: it travels in the module's
``state_dict`` (as its extra state, so checkpoints and policy files restore it) but it is never
advanced by the model. The agent sets it before each behaviour-model loss through
:meth:`ConsistencyModel.set_training_step` with its own update counter. Any behaviour model may
implement this optional ``set_training_step(step)`` hook; ``OfflineAgent`` and
``DiffusionQLAgent`` call it when present. Used alone (e.g. in a script), the model trains with
N = curriculum_start + 1 unless the caller sets the step.

Sampling: one network call, a = f(sigma_max z, sigma_max, s); or several (iCT's multistep
sampler): for each further sigma in ``sample_sigmas``, re-noise a to level sigma and apply f again.
The denoised action is clipped to [-1, 1] after every call (as the DDPM clips x0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from divo.behavior_models.backbones import NoiseNetwork
from divo.behavior_models.base import (
    BehaviorModel,
    draw_indices,
    flatten_batch,
    repeat_for_samples,
)

NOISE_SAMPLING = ("lognormal", "uniform")


def karras_sigmas(num_levels: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Karras et al. (2022) noise levels, ascending: sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1)
    (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho for i = 1..N (float64)."""
    if num_levels < 2:
        raise ValueError(f"need at least 2 noise levels, got {num_levels}")
    ramp = torch.linspace(0.0, 1.0, num_levels, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def ict_num_noise_levels(step: int, total_steps: int, start: int, end: int) -> int:
    """iCT's exponential curriculum N(k) = min(s0 * 2^floor(k / K'), s1) + 1, with
    K' = floor(K / (log2 floor(s1 / s0) + 1)) and K = ``total_steps``."""
    if step < 0 or total_steps < 1 or start < 1 or end < start:
        raise ValueError(
            f"bad curriculum: step {step}, total_steps {total_steps}, start {start}, end {end}"
        )
    doublings = math.floor(math.log2(end // start)) + 1
    stage_len = max(total_steps // doublings, 1)
    return min(start * 2 ** (step // stage_len), end) + 1


def pseudo_huber(diff: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||diff||^2 + c^2) - c over the last dim: [*B, A] -> [*B]."""
    return (diff.pow(2).sum(-1) + c * c).sqrt() - c


class ConsistencyModel(BehaviorModel):
    """Consistency model of pi_b(a | s) with consistency training (iCT).

    Args:
        observation_dim: size of an observation, filled in by the builder.
        action_dim: size of an action, filled in by the builder.
        sigma_min: the smallest noise level.
        sigma_max: the largest noise level.
        sigma_data: the data's scale.
        rho: the Karras schedule's exponent.
        curriculum_start: iCT's s0.
        curriculum_end: iCT's s1.
        curriculum_steps: iCT's K (training steps over which N doubles from s0 + 1 up to
            s1 + 1).
        noise_sampling: ``lognormal`` (iCT: index i with probability proportional to
            erf((ln sigma_{i+1} - p_mean) / (sqrt2 p_std)) - erf((ln sigma_i - p_mean) / (sqrt2
            p_std))) or ``uniform``.
        p_mean: the log-normal's mean.
        p_std: the log-normal's standard deviation.
        huber_c_per_sqrt_dim: pseudo-Huber c = huber_c_per_sqrt_dim * sqrt(action_dim).
        time_scale: c_noise = time_scale * ln(sigma), fed to the sinusoidal time embedding.
        sample_sigmas: noise levels of the sampler, descending, the first one sigma_max; its
            length is the number of network calls per sample.
        hidden: hidden widths of the network (see ``NoiseNetwork``).
        time_dim: size of the time embedding.
        activation: the hidden activation.
        clip_denoised: clip the denoised action to [-1, 1] after every sampler call.
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        curriculum_start: int = 10,
        curriculum_end: int = 1280,
        curriculum_steps: int = 1_000_000,
        noise_sampling: str = "lognormal",
        p_mean: float = -1.1,
        p_std: float = 2.0,
        huber_c_per_sqrt_dim: float = 0.00054,
        time_scale: float = 250.0,
        sample_sigmas: Sequence[float] = (80.0,),
        hidden: Sequence[int] = (256, 256, 256),
        time_dim: int = 16,
        activation: str = "mish",
        clip_denoised: bool = True,
    ) -> None:
        super().__init__(observation_dim, action_dim)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if noise_sampling not in NOISE_SAMPLING:
            raise ValueError(
                f"noise_sampling must be one of {NOISE_SAMPLING}, got {noise_sampling!r}"
            )
        sample_sigmas = [float(s) for s in sample_sigmas]
        if (
            not sample_sigmas
            or any(not sigma_min <= s <= sigma_max for s in sample_sigmas)
            or any(a <= b for a, b in zip(sample_sigmas, sample_sigmas[1:], strict=False))
        ):
            raise ValueError(
                f"sample_sigmas must be descending, non-empty and within [sigma_min, sigma_max], "
                f"got {sample_sigmas}"
            )
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data, self.rho = float(sigma_data), float(rho)
        self.curriculum = (int(curriculum_start), int(curriculum_end), int(curriculum_steps))
        ict_num_noise_levels(0, *self.curriculum[2:], *self.curriculum[:2])  # validates
        self.noise_sampling = noise_sampling
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.huber_c = float(huber_c_per_sqrt_dim) * math.sqrt(action_dim)
        self.time_scale = float(time_scale)
        self.sample_sigmas = sample_sigmas
        self.clip_denoised = clip_denoised
        self.network = NoiseNetwork(
            observation_dim, action_dim, tuple(hidden), time_dim, activation
        )
        # Training state set by the agent (set_training_step), never advanced by the model; a
        # Python int (reading it never syncs with the device), saved as the module's extra state.
        self.num_noise_levels = int(curriculum_start) + 1
        self._levels_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ----- curriculum (owned by the caller) -------------------------------------------------
    def set_training_step(self, step: int) -> None:
        """Set N from the caller's training step with iCT's curriculum."""
        start, end, total = self.curriculum
        self.num_noise_levels = ict_num_noise_levels(int(step), total, start, end)

    def get_extra_state(self) -> dict:
        return {"num_noise_levels": self.num_noise_levels}

    def set_extra_state(self, state: dict) -> None:
        self.num_noise_levels = int(state["num_noise_levels"])

    # ----- the consistency function ---------------------------------------------------------
    def denoise(
        self, x: torch.Tensor, sigma: torch.Tensor, observation: torch.Tensor
    ) -> torch.Tensor:
        """f(x, sigma, s): [B, A], [B], [B, O] -> [B, A]; exactly x at sigma = sigma_min."""
        sd, smin = self.sigma_data, self.sigma_min
        sig = sigma.unsqueeze(-1)
        c_skip = sd**2 / ((sig - smin).pow(2) + sd**2)
        c_out = sd * (sig - smin) / (sig.pow(2) + sd**2).sqrt()
        c_in = 1.0 / (sig.pow(2) + sd**2).sqrt()
        out = self.network(c_in * x, self.time_scale * sigma.log(), observation)
        return c_skip * x + c_out * out

    def noise_levels(
        self, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The current Karras levels sigma_1..sigma_N (ascending, [N]) and the probabilities
        of the training pair indices i = 1..N-1 ([N - 1], unnormalised); cached per N."""
        key = (self.num_noise_levels, device, dtype)
        if key not in self._levels_cache:
            sig = karras_sigmas(self.num_noise_levels, self.sigma_min, self.sigma_max, self.rho)
            if self.noise_sampling == "uniform":
                probs = torch.ones_like(sig[:-1])
            else:
                cdf = torch.erf((sig.log() - self.p_mean) / (math.sqrt(2.0) * self.p_std))
                probs = (cdf[1:] - cdf[:-1]).clamp_min(1e-12)
            self._levels_cache[key] = (
                sig.to(device=device, dtype=dtype),
                probs.to(device=device, dtype=dtype),
            )
        return self._levels_cache[key]

    def per_sample_loss(
        self,
        action: torch.Tensor,
        observation: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """lambda_i * pseudo-Huber(f(x_{i+1}), sg[f(x_i)]): [*B, A], [*B, O] -> [*B]."""
        a, batch_shape = flatten_batch(action)
        obs, _ = flatten_batch(observation)
        sigmas, probs = self.noise_levels(a.device, a.dtype)
        i = draw_indices(probs, a.shape[0], generator)
        z = torch.randn(a.shape, device=a.device, dtype=a.dtype, generator=generator)
        sig_lo, sig_hi = sigmas[i], sigmas[i + 1]
        pred = self.denoise(a + sig_hi.unsqueeze(-1) * z, sig_hi, obs)
        with torch.no_grad():  # iCT: the teacher is the same network under stop-gradient
            target = self.denoise(a + sig_lo.unsqueeze(-1) * z, sig_lo, obs)
        weight = 1.0 / (sig_hi - sig_lo)
        return (weight * pseudo_huber(pred - target, self.huber_c)).reshape(batch_shape)

    def sample(
        self,
        observation: torch.Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """len(sample_sigmas) network calls: [*B, O] -> [*B, N, A] in [-1, 1]."""
        obs, batch_shape = repeat_for_samples(observation, num_samples)
        shape = (obs.shape[0], self.action_dim)
        x = None
        for sigma in self.sample_sigmas:
            z = torch.randn(shape, device=obs.device, dtype=obs.dtype, generator=generator)
            if x is None:
                x = sigma * z
            else:
                x = x + math.sqrt(max(sigma**2 - self.sigma_min**2, 0.0)) * z
            sig = torch.full((shape[0],), sigma, device=obs.device, dtype=obs.dtype)
            x = self.denoise(x, sig, obs)
            if self.clip_denoised:
                x = x.clamp(-1.0, 1.0)
        return x.clamp(-1.0, 1.0).reshape(*batch_shape, num_samples, self.action_dim)
