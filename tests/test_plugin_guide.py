"""docs/plugin_guide.md, executed: a behaviour model written OUTSIDE the package (a mixture-density
network, defined in this file) passes the behaviour-model contract and trains inside DIVO,
selected from the command line with `behavior_model=custom behavior_model._target_=...`; no
file of the package changes."""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from divo.agents.builder import build_agent
from divo.behavior_models import BehaviorModel
from divo.behavior_models.base import flatten_batch
from divo.cli import main
from divo.config import compose_recipe
from divo.errors import ConfigError
from divo.testing import BehaviorModelContract

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugin_guide.md"


# --- the model of the guide (docs/plugin_guide.md shows this class verbatim) -----------------
class MixtureDensityBehavior(BehaviorModel):
    """pi_b(a | s) = sum_k w_k(s) N(a; mu_k(s), diag sigma_k(s)^2), means squashed into [-1, 1]."""

    def __init__(self, observation_dim, action_dim, num_components=5, hidden=(256, 256)):
        super().__init__(observation_dim, action_dim)
        self.num_components = num_components
        layers, width = [], observation_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_components * (1 + 2 * action_dim))

    def mixture(self, observation):
        """Mixture logits [*B, K], means [*B, K, A] and stds [*B, K, A] of pi_b(. | s)."""
        k, a = self.num_components, self.action_dim
        logits, means, log_stds = self.head(self.trunk(observation)).split([k, k * a, k * a], -1)
        means = torch.tanh(means.unflatten(-1, (k, a)))
        stds = log_stds.unflatten(-1, (k, a)).clamp(-5.0, 1.0).exp()
        return logits, means, stds

    def per_sample_loss(self, action, observation, generator=None):
        """-log pi_b(a | s) per transition: [*B, A], [*B, O] -> [*B], never batch-averaged."""
        logits, means, stds = self.mixture(observation)
        normal = torch.distributions.Normal(means, stds)
        log_prob = normal.log_prob(action.unsqueeze(-2)).sum(-1)  # [*B, K]
        return -torch.logsumexp(torch.log_softmax(logits, -1) + log_prob, dim=-1)

    def sample(self, observation, num_samples=1, generator=None):
        """[*B, O] -> [*B, N, A] in [-1, 1]: draw a component, then its Gaussian noise."""
        obs, batch_shape = flatten_batch(observation)
        logits, means, stds = self.mixture(obs)
        probs = torch.softmax(logits, -1)
        k = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        index = k.unsqueeze(-1).expand(-1, -1, self.action_dim)  # [B, N, A]
        mean, std = means.gather(1, index), stds.gather(1, index)
        noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device, generator=generator)
        action = (mean + std * noise).clamp(-1.0, 1.0)
        return action.reshape(*batch_shape, num_samples, self.action_dim)


# --- the guide's steps -------------------------------------------------------------------------

TARGET = f"{__name__}.MixtureDensityBehavior"  # the import path Hydra locates


def test_the_guide_shows_exactly_this_model():
    assert inspect.getsource(MixtureDensityBehavior) in GUIDE.read_text()


class TestMixtureDensityContract(BehaviorModelContract):
    """Step 3 of the guide: run the package's behaviour-model contract on the outside model."""

    @pytest.fixture
    def model_factory(self):
        return functools.partial(MixtureDensityBehavior, num_components=3, hidden=(32,))


def _guide_block(marker: str) -> str:
    """The guide's Python code block that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def _run_guide_test(folder: Path, model_source: str) -> subprocess.CompletedProcess:
    """Step 3 as written: my_mdn.py and test_my_mdn.py in a folder of their own (not divo's),
    then `python -m pytest test_my_mdn.py` there."""
    folder.mkdir()
    (folder / "my_mdn.py").write_text(model_source)
    (folder / "test_my_mdn.py").write_text(_guide_block("from divo.testing import"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_mdn.py"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_guides_contract_command_works_as_written_and_builds_like_the_builder(
    tmp_path, monkeypatch
):
    model = _guide_block("class MixtureDensityBehavior")
    passed = _run_guide_test(tmp_path / "mine", model)
    assert passed.returncode == 0, passed.stdout[-3000:]
    assert "9 passed" in passed.stdout
    # an independently written model whose constructor says obs_dim: divo's builder passes
    # observation_dim= by keyword, so the contract refuses it as the builder does
    failed = _run_guide_test(tmp_path / "theirs", model.replace("observation_dim", "obs_dim"))
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert "builder calls the behaviour model as factory(observation_dim=" in failed.stdout
    monkeypatch.syspath_prepend(str(tmp_path / "theirs"))
    monkeypatch.delitem(sys.modules, "my_mdn", raising=False)
    overrides = ["behavior_model=custom", "behavior_model._target_=my_mdn.MixtureDensityBehavior"]
    with pytest.raises(ConfigError, match="cannot build behavior_model.*observation_dim"):
        build_agent(
            compose_recipe("divo", overrides),
            observation_dim=3, action_dim=2, obs_mean=torch.zeros(3), obs_std=torch.ones(3),
        )  # fmt: skip
    sys.modules.pop("my_mdn", None)


def command(*extra: str) -> list[str]:
    """The guide's command line (small networks and few steps for the test)."""
    return [
        "train",
        "divo",
        "behavior_model=custom",
        f"behavior_model._target_={TARGET}",
        "+behavior_model.num_components=4",
        "+behavior_model.hidden=[32,32]",
        *extra,
    ]


def test_the_outside_model_is_selected_from_the_command_line():
    overrides = command()[2:]
    cfg = compose_recipe("divo", overrides)
    agent = build_agent(
        cfg, observation_dim=1, action_dim=2, obs_mean=torch.zeros(1), obs_std=torch.ones(1)
    )
    assert type(agent.behavior_model) is MixtureDensityBehavior
    assert agent.behavior_model.num_components == 4
    assert agent.behavior_model.observation_dim == 1 and agent.behavior_model.action_dim == 2


@pytest.mark.slow
def test_the_outside_model_trains_inside_divo(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = command(
        "--quiet",
        "critic.network.hidden=[32,32]",
        "actor.network.hidden=[32,32]",
        "value.network.hidden=[32,32]",
        "train.steps=100",
        "train.eval_every=100",
        "train.log_every=50",
        "train.eval_episodes=2",
        "train.batch_size=64",
        f"hydra.run.dir={run_dir}",
    )
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 100 and result["return_mean"] is not None
    assert TARGET in (run_dir / "config.yaml").read_text()
    header, *rows = (run_dir / "metrics.csv").read_text().splitlines()
    loss = float(rows[-1].split(",")[header.split(",").index("loss_behavior")])
    assert torch.isfinite(torch.tensor(loss))


def test_without_a_target_the_custom_slot_says_what_to_set():
    from divo.errors import ConfigError

    for group in ("behavior_model", "weighting", "selector"):
        with pytest.raises(ConfigError, match=f"{group}._target_"):
            compose_recipe("divo", [f"{group}=custom"])


# --- models that break the protocol are refused when the agent is built ----------------------
class _Linear(nn.Module):
    def __init__(self, observation_dim, action_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(observation_dim, action_dim), nn.Dropout(0.5))

    def sample(self, observation, num_samples=1, generator=None):
        out = self.net(observation) + torch.randn(observation.shape[0], 1)
        return out.unsqueeze(-2).expand(*observation.shape[:-1], num_samples, -1)

    def per_sample_loss(self, action, observation, generator=None):
        return ((self.net(observation) - action) ** 2).mean(-1)


class NoLoss(_Linear):
    per_sample_loss = None


class NoGenerator(_Linear):
    def per_sample_loss(self, action, observation):
        return super().per_sample_loss(action, observation)


class BatchMean(_Linear):
    def per_sample_loss(self, action, observation, generator=None):
        return super().per_sample_loss(action, observation).mean()


class ExpandedMean(_Linear):  # one value for the batch, in the shape of one per transition
    def per_sample_loss(self, action, observation, generator=None):
        loss = super().per_sample_loss(action, observation)
        return loss.mean().expand(loss.shape[0])


class Detached(_Linear):  # a loss taken out of the graph: the weighted loss cannot train it
    def per_sample_loss(self, action, observation, generator=None):
        return super().per_sample_loss(action, observation).detach()


class OneSample(_Linear):
    def sample(self, observation, num_samples=1, generator=None):
        return self.net(observation)


class Crashes(_Linear):
    def sample(self, observation, num_samples=1, generator=None):
        raise RuntimeError("boom")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("NoLoss", "has no per_sample_loss\\(\\) method"),
        ("NoGenerator", "per_sample_loss\\(\\) takes no generator keyword; add generator=None"),
        ("BatchMean", "returned \\(\\), not shape \\(2,\\); return one loss per transition"),
        ("ExpandedMean", "gave two different transitions the same loss"),
        ("Detached", "returned a tensor detached from the model's parameters"),
        ("OneSample", "num_samples=3\\) returned \\(2, 3\\), not \\(2, 3, 3\\)"),
        ("Crashes", "failed on a probe batch .*RuntimeError: boom"),
    ],
)
@pytest.mark.parametrize("recipe", ["divo", "diffusion_ql"])
def test_models_breaking_the_protocol_are_refused_by_name(recipe, model, message):
    from divo.errors import ConfigError

    cfg = compose_recipe(
        recipe, ["behavior_model=custom", f"behavior_model._target_={__name__}.{model}"]
    )
    with pytest.raises(ConfigError, match=f"test_plugin_guide.{model}.*{message}"):
        build_agent(cfg, observation_dim=11, action_dim=3, obs_mean=torch.zeros(11),
                    obs_std=torch.ones(11))  # fmt: skip


def test_the_protocol_check_leaves_no_trace():
    """The probe draws no random numbers from the global stream and leaves the training flags
    and parameters as they were."""
    from divo.behavior_models import check_behavior_model

    model = _Linear(11, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_behavior_model(model, 11, 3)
    torch.testing.assert_close(torch.rand(3), expected)
    assert all(m.training for m in model.modules())
    model.eval()
    check_behavior_model(model, 11, 3)
    assert not any(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


# --- weighting schemes and target selectors plug in the same way -----------------------------
from divo.objectives import TargetSelector, WeightingScheme  # noqa: E402


class ClippedLinearWeight(WeightingScheme):
    """w = clip(1 + scale * A, 0, 2): a soft ramp between PAD's step and AWR's exponential."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    @torch.no_grad()
    def forward(self, advantage):
        return (1.0 + self.scale * advantage).clamp(0.0, 2.0)


class MeanOfCandidates(TargetSelector):
    """Target = the mean of the candidates with positive advantage, else the dataset action."""

    needs_advantage = True

    def __init__(self, num_candidates=4):
        super().__init__()
        self.num_candidates = num_candidates

    def forward(self, candidates, candidate_advantage, action, action_advantage=None):
        good = (candidate_advantage > 0).to(candidates.dtype)  # [*B, N, 1]
        count = good.sum(-2)  # [*B, 1]
        mean = (good * candidates).sum(-2) / count.clamp_min(1.0)
        return torch.where(count > 0, mean, action), torch.ones_like(action[..., :1])


class NegativeWeight(ClippedLinearWeight):
    def forward(self, advantage):
        return advantage


class ReadsAdvantageUnsaid(ClippedLinearWeight):  # would be handed zeros, never advantages
    needs_advantage = False


class NoFlags:
    def __call__(self, candidates, candidate_advantage, action, action_advantage=None):
        return action, torch.ones_like(action[..., :1])


class TargetOnly(MeanOfCandidates):
    def forward(self, candidates, candidate_advantage, action, action_advantage=None):
        return super().forward(candidates, candidate_advantage, action)[0]


class OutOfRange(MeanOfCandidates):  # targets the tanh actor can never reach
    def forward(self, candidates, candidate_advantage, action, action_advantage=None):
        target, mask = super().forward(candidates, candidate_advantage, action)
        return 3.0 * target + 1.5, mask


class NanMask(MeanOfCandidates):  # a NaN mask passes a `mask < 0` check
    def forward(self, candidates, candidate_advantage, action, action_advantage=None):
        target, mask = super().forward(candidates, candidate_advantage, action)
        return target, mask * float("nan")


def test_custom_weighting_and_selector_train_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "divo",
        "weighting=custom",
        f"weighting._target_={__name__}.ClippedLinearWeight",
        "+weighting.scale=0.5",
        "selector=custom",
        f"selector._target_={__name__}.MeanOfCandidates",
        "+selector.num_candidates=3",
        "dataset=bandit",
        "train.steps=20",
        "train.eval_every=20",
        "train.eval_episodes=2",
        "train.batch_size=32",
        "--quiet",
        f"hydra.run.dir={run}",
    ]
    assert main(args) == 0, capsys.readouterr().err
    with (run / "metrics.csv").open() as f:
        last = f.read().splitlines()[-1]
    assert last.startswith("20,")
    assert json.loads((run / "result.json").read_text())["steps"] == 20


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["weighting=custom", f"weighting._target_={__name__}.NegativeWeight"],
            "NegativeWeight gave weights .* must be finite and non-negative",
        ),
        (
            [
                "weighting=custom",
                f"weighting._target_={__name__}.ReadsAdvantageUnsaid",
                "selector=dataset",
            ],
            "ReadsAdvantageUnsaid says needs_advantage=False but its weights depend on",
        ),
        (
            ["selector=custom", f"selector._target_={__name__}.NoFlags"],
            "NoFlags must be callable and say .* num_candidates",
        ),
        (
            ["selector=custom", f"selector._target_={__name__}.TargetOnly"],
            "TargetOnly returned .* must return \\(target \\[2, 3\\], mask \\[2, 1\\]\\)",
        ),
        (
            ["selector=custom", f"selector._target_={__name__}.OutOfRange"],
            "OutOfRange returned targets .* the normalised \\[-1, 1\\] space",
        ),
        (
            ["selector=custom", f"selector._target_={__name__}.NanMask"],
            "NanMask returned the BC mask .* must be finite and >= 0",
        ),
    ],
)
def test_weightings_and_selectors_breaking_the_protocol_are_refused(override, message):
    from divo.errors import ConfigError

    cfg = compose_recipe("divo", override)
    with pytest.raises(ConfigError, match=message):
        build_agent(cfg, observation_dim=11, action_dim=3, obs_mean=torch.zeros(11),
                    obs_std=torch.ones(11))  # fmt: skip
