"""Contract tests for plug-ins, to subclass in your own test file (needs pytest).

As TorchRL and Gymnasium ship their checkers, divo ships the behaviour-model contract its own
models pass; a model that passes it builds and trains in ``divo train``::

    # test_my_mdn.py, in your own folder: python -m pytest test_my_mdn.py
    import functools

    import pytest

    from divo.testing import BehaviorModelContract
    from my_mdn import MixtureDensityBehavior


    class TestMixtureDensityContract(BehaviorModelContract):
        @pytest.fixture
        def model_factory(self):
            return functools.partial(MixtureDensityBehavior, num_components=3, hidden=(32,))

The factory is what the recipe's ``behavior_model`` node instantiates to (its class, with your
arguments bound). The contract builds the model from it exactly as divo's builder does, by
keyword: ``factory(observation_dim=O, action_dim=A)``, then runs the builder's protocol check
(:func:`divo.behavior_models.check_behavior_model`) on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tensordict import TensorDict

from divo.behavior_models import (
    BehaviorModel,
    as_policy_module,
    as_sampler_module,
    check_behavior_model,
)

O, A = 3, 2  # noqa: E741 - the observation and action sizes the contract builds models with

__all__ = ["A", "O", "BehaviorModelContract", "build_behavior_model"]


def build_behavior_model(
    factory: Callable[..., Any], observation_dim: int = O, action_dim: int = A
) -> BehaviorModel:
    """A behaviour model built as ``divo train`` builds it: the sizes passed by keyword
    (``observation_dim=``, ``action_dim=``), then the protocol check the builder runs."""
    try:
        model = factory(observation_dim=observation_dim, action_dim=action_dim)
    except TypeError as exc:
        pytest.fail(
            f"divo's builder calls the behaviour model as factory(observation_dim="
            f"{observation_dim}, action_dim={action_dim}) and this factory refuses it ({exc}); "
            "name the constructor's first two parameters observation_dim and action_dim",
            pytrace=False,
        )
    check_behavior_model(model, observation_dim, action_dim)
    return model


class BehaviorModelContract:
    """The behaviour-model contract; subclass it and define a ``model_factory`` fixture."""

    @pytest.fixture
    def model_factory(self) -> Callable[..., Any]:
        pytest.fail(
            "define a model_factory fixture returning your class (or a functools.partial of "
            "it with your arguments bound)",
            pytrace=False,
        )

    @pytest.fixture
    def model(self, model_factory: Callable[..., Any]) -> BehaviorModel:
        torch.manual_seed(0)
        return build_behavior_model(model_factory)

    def test_builds_as_divo_builds_it(self, model_factory):
        model = build_behavior_model(model_factory, observation_dim=5, action_dim=4)
        assert model.sample(torch.randn(2, 5)).shape == (2, 1, 4)

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
        td = TensorDict({"observation": torch.randn(5, O)}, batch_size=[5])
        assert as_policy_module(model)(td)["action"].shape == (5, A)
        assert as_sampler_module(model, 3)(td)["candidate_action"].shape == (5, 3, A)
