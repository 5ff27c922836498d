"""Contract tests every behaviour model must pass, and DDPM specifics."""

import functools
import math

import pytest
import torch

from divo.behavior_models import (
    CVAE,
    DDPM,
    ConsistencyModel,
    FlowMatching,
    GaussianBehavior,
)
from divo.behavior_models.base import draw_indices
from divo.behavior_models.schedules import DiffusionSchedule, vp_betas
from divo.testing import A, BehaviorModelContract, O

# Every behaviour model of the package is listed here and runs the whole contract
# (divo.testing, the same class a user's plug-in tests subclass).
MODEL_FACTORIES = {
    "ddpm": functools.partial(DDPM, hidden=(32, 32)),
    "ddpm_linear": functools.partial(DDPM, num_steps=3, schedule="linear", hidden=(32,)),
    "ddpm_ln_resnet": functools.partial(
        DDPM, network="ln_resnet", hidden=(32, 32), time_dim=8, dropout=0.1
    ),
    "ddpm_idql_sampler": functools.partial(DDPM, hidden=(32,), sampler="idql"),
    "cvae": functools.partial(CVAE, hidden=(32, 32)),
    "consistency_1step": functools.partial(ConsistencyModel, hidden=(32, 32)),
    "consistency_2step": functools.partial(
        ConsistencyModel, hidden=(32,), sample_sigmas=(80.0, 0.8)
    ),
    "gaussian": functools.partial(GaussianBehavior, hidden=(32,)),
    "flow": functools.partial(FlowMatching, hidden=(32, 32), num_steps=3),
    "flow_1step": functools.partial(FlowMatching, hidden=(16,), num_steps=1),
    "flow_fql_network": functools.partial(  # FQL's: GELU, LayerNorm, Xavier init
        FlowMatching,
        hidden=(32, 32),
        activation="gelu_tanh",
        layer_norm=True,
        init="xavier_uniform",
    ),
}


class TestShippedModelsContract(BehaviorModelContract):
    @pytest.fixture(params=sorted(MODEL_FACTORIES))
    def model_factory(self, request):
        return MODEL_FACTORIES[request.param]


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


def test_idql_sampler_step_by_hand():
    """IDQL's ddpm_sampler: x_(k-1) = (x_k - beta_k / sqrt(1 - abar_k) eps) / sqrt(alpha_k)
    + sqrt(beta_k) z (no noise at the last step), x_(k-1) clipped to [-1, 1]."""
    m = DDPM(O, A, hidden=(16,), sampler="idql")
    eps = torch.full((4, A), 0.3)

    class KnownNoise(torch.nn.Module):  # a known noise prediction
        def forward(self, x, k, obs):
            return eps

    m.network = KnownNoise()
    x, obs = torch.full((4, A), 0.2), torch.randn(4, O)
    s = m.schedule
    for k in (0, 2):
        beta = s.betas[k]
        mean = (x - beta / (1 - s.alphas_cumprod[k]).sqrt() * eps) / (1 - beta).sqrt()
        gen = torch.Generator().manual_seed(5)
        out = m.reverse_step(x, k, obs, gen)
        if k == 0:  # deterministic, clipped
            torch.testing.assert_close(out, mean.clamp(-1, 1))
        else:
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
            torch.testing.assert_close(out, (mean + beta.sqrt() * z).clamp(-1, 1))
    big = torch.full((4, A), 50.0)  # x itself is clipped, whatever the step
    assert m.reverse_step(big, 3, obs).abs().max() <= 1.0
    with pytest.raises(ValueError, match="sampler"):
        DDPM(O, A, sampler="ddim")


def test_ln_resnet_noise_network_by_hand():
    """IDQL's network: Fourier time features -> 2-layer time code; concat[x, s, code] ->
    Linear -> blocks x + W2 mish(W1 LN(x)) -> mish -> Linear. Dropout only in the loss's pass,
    drawn from its generator."""
    from divo.behavior_models.backbones import ResidualNoiseNetwork, mish

    torch.manual_seed(0)
    net = ResidualNoiseNetwork(O, A, hidden=(8, 8), time_dim=4, dropout=0.5)
    x, obs, t = torch.randn(5, A), torch.randn(5, O), torch.tensor([0, 1, 2, 3, 4])
    w = net.time_mlp[0].weight
    f = 2 * math.pi * t.float()[:, None] * w[None, :]
    code = torch.cat([f.cos(), f.sin()], -1)
    code = net.time_mlp[3](mish(net.time_mlp[1](code)))
    h = net.inp(torch.cat([x, obs, code], -1))
    for block in net.blocks:
        ln = torch.nn.functional.layer_norm(h, (8,), block.norm.weight, block.norm.bias)
        h = h + block.outer(mish(block.inner(ln)))
    expected = net.out(mish(h))
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, obs), expected)
        torch.testing.assert_close(net(x, t, obs, training_pass=False), expected)
        g = [torch.Generator().manual_seed(1) for _ in range(2)]
        dropped = net(x, t, obs, training_pass=True, generator=g[0])
        assert not torch.allclose(dropped, expected)
        torch.testing.assert_close(net(x, t, obs, training_pass=True, generator=g[1]), dropped)
    assert len(net.blocks) == 2 and net.blocks[0].inner.out_features == 32  # 4 x width


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"network": "transformer"}, "network='transformer' is not a noise network"),
        ({"network": "ln_resnet", "hidden": (64, 32)}, "one width for all its residual blocks"),
        ({"network": "ln_resnet", "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": 0.1}, "dropout=0.1 needs network=ln_resnet"),
    ],
)
def test_ddpm_network_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDPM(O, A, **kwargs)


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


# ----- CVAE ---------------------------------------------------------------------------------


def test_cvae_loss_is_bcq_negative_elbo_per_sample():
    """Per-sample loss = mean_A (a - dec(s, mu + std eps))^2 + 0.5 * mean_L KL, by hand."""
    torch.manual_seed(0)
    m = CVAE(O, A, hidden=(16,))
    assert m.latent_dim == 2 * A and m.kl_weight == 0.5 and m.prior_clip == 0.5
    obs, act = torch.randn(5, O), torch.rand(5, A) * 2 - 1
    loss = m.per_sample_loss(act, obs, generator=torch.Generator().manual_seed(3))
    out = m.encoder(torch.cat([obs, act], -1))
    mean, log_std = out[:, : 2 * A], out[:, 2 * A :].clamp(-4, 15)
    eps = torch.randn(5, 2 * A, generator=torch.Generator().manual_seed(3))
    recon = m.decoder(torch.cat([obs, mean + log_std.exp() * eps], -1))
    kl = 0.5 * (mean**2 + (2 * log_std).exp() - 1 - 2 * log_std)
    expected = ((recon - act) ** 2).mean(-1) + 0.5 * kl.mean(-1)
    torch.testing.assert_close(loss, expected)
    # its batch mean is BCQ's vae_loss = mse(recon, a) + 0.5 * KL averaged over batch and dims
    bcq = torch.nn.functional.mse_loss(recon, act) + 0.5 * kl.mean()
    torch.testing.assert_close(loss.mean(), bcq)


def test_cvae_samples_decode_clipped_prior_latents():
    m = CVAE(O, A, hidden=(16,), prior_clip=0.5)
    seen = []
    m.decoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][:, O:]))
    m.sample(torch.randn(4, O), num_samples=50)
    z = seen[0]
    assert z.shape == (200, 2 * A) and z.abs().max() <= 0.5 and (z.abs() == 0.5).any()


# ----- Gaussian -----------------------------------------------------------------------------


def test_gaussian_loss_is_the_negative_log_likelihood():
    m = GaussianBehavior(O, A, hidden=(16,))
    obs, act = torch.randn(6, O), torch.rand(6, A) * 2 - 1
    mean, std = m.distribution_parameters(obs)
    nll = -torch.distributions.Normal(mean, std).log_prob(act).sum(-1)
    torch.testing.assert_close(m.per_sample_loss(act, obs), nll)


# ----- consistency model --------------------------------------------------------------------


def count_network_calls(model, fn):
    calls = []
    handle = model.network.register_forward_hook(lambda *args: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("sigmas", [(80.0,), (80.0, 0.3)])
def test_consistency_samples_with_one_network_call_per_sampler_level(sigmas):
    m = ConsistencyModel(O, A, hidden=(16,), sample_sigmas=sigmas)
    obs = torch.randn(5, O)
    out = []
    calls = count_network_calls(m, lambda: out.append(m.sample(obs, num_samples=3)))
    assert calls == len(sigmas)  # 1 call for one-step sampling, 2 for two-step
    assert out[0].shape == (5, 3, A) and out[0].abs().max() <= 1


def test_consistency_function_is_the_identity_at_sigma_min():
    m = ConsistencyModel(O, A, hidden=(16,))
    x, obs = torch.randn(4, A), torch.randn(4, O)
    torch.testing.assert_close(m.denoise(x, torch.full((4,), m.sigma_min), obs), x)
    assert not torch.allclose(m.denoise(x, torch.full((4,), 1.0), obs), x)


def test_karras_levels_and_ict_curriculum_by_hand():
    from divo.behavior_models.consistency import ict_num_noise_levels, karras_sigmas

    s = karras_sigmas(11, 0.002, 80.0, 7.0)
    assert s[0].item() == pytest.approx(0.002) and s[-1].item() == pytest.approx(80.0)
    mid = (0.002 ** (1 / 7) + 0.5 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    assert s[5].item() == pytest.approx(mid)
    assert (s[1:] > s[:-1]).all()
    # iCT: s0 = 10, s1 = 1280 over K = 800 steps: log2(128) + 1 = 8 stages of 100 steps
    assert [ict_num_noise_levels(k, 800, 10, 1280) for k in (0, 99, 100, 250, 699, 700, 10**6)] == [
        11,
        11,
        21,
        41,
        641,
        1281,
        1281,
    ]


def test_draw_indices_follows_the_weights():
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([1.0, 0.0, 3.0, 4.0])
    idx = draw_indices(weights, 80_000, g)
    assert idx.dtype == torch.long and idx.shape == (80_000,)
    freq = torch.bincount(idx, minlength=4).float() / idx.numel()
    torch.testing.assert_close(freq, weights / weights.sum(), atol=0.01, rtol=0)
    assert not (idx == 1).any()  # a zero weight is never drawn


def test_consistency_loss_by_hand_and_teacher_gets_no_gradient():
    """l = (1 / (s_hi - s_lo)) * pseudo_huber(f(a + s_hi z), sg[f(a + s_lo z)]) per sample."""
    m = ConsistencyModel(O, A, hidden=(16,), noise_sampling="uniform")
    obs, act = torch.randn(5, O), torch.rand(5, A) * 2 - 1
    loss = m.per_sample_loss(act, obs, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    sig, probs = m.noise_levels()
    i = draw_indices(probs, 5, g)
    z = torch.randn(5, A, generator=g)
    lo, hi = sig[i], sig[i + 1]
    pred = m.denoise(act + hi[:, None] * z, hi, obs)
    target = m.denoise(act + lo[:, None] * z, lo, obs)
    c = 0.00054 * math.sqrt(A)
    expected = (((pred - target) ** 2).sum(-1) + c**2).sqrt() - c
    torch.testing.assert_close(loss, expected / (hi - lo))
    # the gradient flows through the student branch only: equal to d/dtheta of pred alone
    m.zero_grad()
    loss.sum().backward()
    grad_full = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    diff = pred - target.detach()
    ((((diff**2).sum(-1) + c**2).sqrt() - c) / (hi - lo)).sum().backward()
    for g1, g2 in zip(grad_full, (p.grad for p in m.parameters()), strict=True):
        torch.testing.assert_close(g1, g2)


def test_consistency_curriculum_is_set_by_the_caller_and_saved_as_state():
    m = ConsistencyModel(O, A, hidden=(16,), curriculum_steps=800)
    assert m.num_noise_levels == 11
    for _ in range(3):  # the loss never advances it
        m.per_sample_loss(torch.rand(4, A), torch.randn(4, O))
    assert m.num_noise_levels == 11
    m.set_training_step(250)
    assert m.num_noise_levels == 41 and m.noise_levels()[0].shape == (41,)
    fresh = ConsistencyModel(O, A, hidden=(16,), curriculum_steps=800)
    fresh.load_state_dict(m.state_dict())
    assert fresh.num_noise_levels == 41


# ----- the four-mode bandit: who recovers the modes -------------------------------------------


@pytest.mark.slow
def test_ddpm_and_consistency_recover_the_four_bandit_modes_and_a_gaussian_does_not():
    """Diffusion-QL's toy: four Gaussian modes at (+-0.8, +-0.8). Numbers: the share of 2,000
    samples within 0.2 (4 std) of each mode (0.25 each for a perfect model)."""
    from divo.studies.bandit import (
        behavior_model_config,
        fit_behavior_model,
        four_mode_data,
        mode_coverage,
        study_config,
    )

    cfg = study_config(["behavior_models.fit.steps=2000"])  # the study's models, smaller
    data = four_mode_data(4000, seed=0)
    lr = {"ddpm": 3e-3, "consistency": 1e-3, "gaussian": 1e-3}  # 64-wide nets, 2,000 steps
    shares = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest on a shared machine
    try:
        for name in lr:
            model_cfg = behavior_model_config(cfg, name, hidden=[64, 64])
            model = fit_behavior_model(
                model_cfg, data, steps=2000, batch_size=256, lr=lr[name], seed=0
            )
            with torch.no_grad():
                samples = model.sample(torch.zeros(1, 1), 2000, torch.Generator().manual_seed(0))
            shares[name] = mode_coverage(samples[0])
    finally:
        torch.set_num_threads(threads)
    assert min(shares["ddpm"]) > 0.1 and sum(shares["ddpm"]) > 0.7, shares
    assert min(shares["consistency"]) > 0.1 and sum(shares["consistency"]) > 0.6, shares
    assert max(shares["gaussian"]) < 0.05, shares


@pytest.mark.slow
def test_the_k5_ddpm_returns_a_denoised_mean_where_the_flow_keeps_the_spread():
    """examples/sample_spread.py: a = 0.5 s + N(0, 0.12^2). DIVO's K = 5 DDPM ends its reverse
    chain on the x0-prediction from x_1, E[x0 | x_1], whose spread for Gaussian data is
    sigma sqrt(sigma^2 / (sigma^2 + (1 - abar_1) / abar_1)) = 0.028 (abar_1 = 0.804); 10 Euler
    steps of the flow keep most of it (docs/method.md, "What K = 5 can represent")."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "sample_spread.py"
    spec = importlib.util.spec_from_file_location("sample_spread_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ddpm = example.build_model("ddpm")
        abar_1 = float(ddpm.schedule.alphas_cumprod[0])
        predicted = 0.12 * (0.12**2 / (0.12**2 + (1 - abar_1) / abar_1)) ** 0.5
        spread = {
            "ddpm": example.sample_spread(ddpm, 0.12, steps=1500),
            "flow": example.sample_spread(example.build_model("flow"), 0.12, steps=1500),
        }
    finally:
        torch.set_num_threads(threads)
    assert abs(predicted - 0.028) < 0.001
    assert spread["ddpm"]["sample_std"] < 0.06, spread  # under half the data's spread
    assert spread["flow"]["sample_std"] > 0.08, spread
    for out in spread.values():  # both find the conditional mean
        assert out["mean_error"] < 0.03, spread
