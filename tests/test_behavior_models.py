"""Contract tests every behaviour model must pass, and DDPM specifics."""

import math

import pytest
import torch

from divo.behavior_models import DDPM, BehaviorModel, as_policy_module, as_sampler_module
from divo.behavior_models.schedules import DiffusionSchedule, vp_betas

O, A = 3, 2  # noqa: E741 - observation and action sizes, as in the docstrings

# Every behaviour model of the package is listed here and runs the whole contract.
MODEL_FACTORIES = {
    "ddpm": lambda: DDPM(O, A, hidden=(32, 32)),
    "ddpm_linear": lambda: DDPM(O, A, num_steps=3, schedule="linear", hidden=(32,)),
}


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model(request) -> BehaviorModel:
    torch.manual_seed(0)
    return MODEL_FACTORIES[request.param]()


class TestBehaviorModelContract:
    def test_per_sample_loss_is_never_batch_averaged(self, model):
        obs, act = torch.randn(4, 5, O), torch.rand(4, 5, A) * 2 - 1
        loss = model.per_sample_loss(act, obs)
        assert loss.shape == (4, 5)
        assert torch.isfinite(loss).all()
        loss.sum().backward()
        assert any(p.grad is not None for p in model.parameters())

    def test_sample_shape_range_and_stochasticity(self, model):
        obs = torch.randn(6, O)
        s = model.sample(obs, num_samples=4)
        assert s.shape == (6, 4, A)
        assert s.min() >= -1 and s.max() <= 1
        assert not torch.allclose(s[:, 0], s[:, 1])

    def test_sample_keeps_leading_batch_dims(self, model):
        assert model.sample(torch.randn(2, 3, O), num_samples=5).shape == (2, 3, 5, A)

    def test_generator_makes_samples_reproducible(self, model):
        obs = torch.randn(3, O)
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        torch.testing.assert_close(
            model.sample(obs, 2, generator=g1), model.sample(obs, 2, generator=g2)
        )
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        act = torch.rand(3, A)
        torch.testing.assert_close(
            model.per_sample_loss(act, obs, generator=g1),
            model.per_sample_loss(act, obs, generator=g2),
        )

    def test_forward_is_the_policy_view(self, model):
        assert model(torch.randn(7, O)).shape == (7, A)

    def test_sample_is_differentiable_unless_disabled(self, model):
        obs = torch.randn(4, O)
        model.sample(obs).sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        with torch.no_grad():
            assert not model.sample(obs).requires_grad

    def test_holds_no_optimizer_state(self, model):
        assert not any(isinstance(v, torch.optim.Optimizer) for v in vars(model).values())

    def test_tensordict_views(self, model):
        from tensordict import TensorDict

        td = TensorDict({"observation": torch.randn(5, O)}, batch_size=[5])
        assert as_policy_module(model)(td)["action"].shape == (5, A)
        assert as_sampler_module(model, 3)(td)["candidate_action"].shape == (5, 3, A)


def test_vp_schedule_matches_formula():
    K, b_min, b_max = 5, 0.1, 10.0
    betas = vp_betas(K, b_min, b_max)
    for k in range(1, K + 1):
        expected = 1 - math.exp(-b_min / K - 0.5 * (b_max - b_min) * (2 * k - 1) / K**2)
        assert betas[k - 1].item() == pytest.approx(expected)


def test_ddpm_forward_process_and_posterior_are_consistent():
    s = DiffusionSchedule(5, "vp")
    abar = torch.cumprod(1 - s.betas.double(), 0)
    torch.testing.assert_close(s.alphas_cumprod.double(), abar, rtol=1e-5, atol=1e-6)
    # posterior mean of x_{k-1} given a noise-free x_k of x0 is sqrt(abar_{k-1}) x0
    x0 = torch.tensor([[0.3, -0.7]])
    for k in range(1, 5):
        xk = s.sqrt_alphas_cumprod[k] * x0
        mean = s.posterior_mean_coef1[k] * x0 + s.posterior_mean_coef2[k] * xk
        torch.testing.assert_close(mean, s.sqrt_alphas_cumprod[k - 1] * x0, rtol=1e-4, atol=1e-5)


def test_ddpm_last_reverse_step_adds_no_noise():
    m = DDPM(O, A, hidden=(16,))
    x, obs = torch.randn(4, A), torch.randn(4, O)
    torch.testing.assert_close(m.reverse_step(x, 0, obs), m.reverse_step(x, 0, obs))
    assert not torch.allclose(m.reverse_step(x, 2, obs), m.reverse_step(x, 2, obs))


@pytest.mark.slow
def test_ddpm_learns_a_two_mode_distribution():
    """A DDPM fitted to two well-separated modes samples both, and little in between.

    (K = 20 here: with DIVO's K = 5 the reverse chain's Gaussian steps blur two close modes
    noticeably; PAD only needs the positive-advantage mode(s).)"""
    torch.manual_seed(0)
    m = DDPM(1, 1, num_steps=20, hidden=(64, 64))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    obs = torch.zeros(512, 1)
    for _ in range(1500):
        a = torch.where(torch.rand(512, 1) < 0.5, -0.6, 0.6) + 0.05 * torch.randn(512, 1)
        loss = m.per_sample_loss(a, obs).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        s = m.sample(torch.zeros(1, 1), 2000).flatten()
    near_left = ((s + 0.6).abs() < 0.2).float().mean().item()
    near_right = ((s - 0.6).abs() < 0.2).float().mean().item()
    assert near_left > 0.3 and near_right > 0.3, (near_left, near_right)
    assert near_left + near_right > 0.85
