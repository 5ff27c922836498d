"""Each loss against a value computed by hand on a tiny batch, with linear networks whose
weights are set explicitly (hidden=() makes every MLP a single linear layer)."""

import math

import pytest
import torch
from torch import nn

from divo.objectives import (
    ADPOSelector,
    Advantage,
    BinaryWeight,
    DatasetSelector,
    ExpAWRWeight,
    ResamplingSelector,
    StateValue,
    TD3BCActorLoss,
    TD3CriticLoss,
    TwinQ,
    UniformWeight,
    ValueLoss,
    WeightedBehaviorLoss,
)
from divo.objectives.functional import expectile_loss, polyak_update, td_target


def linear_twin_q() -> TwinQ:
    """Q1(s, a) = 2 s + 1 a + 0;  Q2(s, a) = 1 s + 0 a + 0.5  (O = A = 1)."""
    q = TwinQ(1, 1, hidden=())
    lin = q.net.net[0]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[[2.0], [1.0]], [[1.0], [0.0]]]))
        lin.bias.copy_(torch.tensor([[[0.0]], [[0.5]]]))
    return q


def const_value(c: float) -> StateValue:
    v = StateValue(1, hidden=())
    with torch.no_grad():
        v.net[0].weight.zero_()
        v.net[0].bias.fill_(c)
    return v


OBS = torch.tensor([[1.0]])
ACT = torch.tensor([[0.5]])


def test_expectile_loss_by_hand():
    out = expectile_loss(torch.tensor([1.0, -2.0]), 0.7)
    torch.testing.assert_close(out, torch.tensor([0.7 * 1.0, 0.3 * 4.0]))


def test_td_target_uses_true_terminals_only():
    r = torch.tensor([[1.0], [1.0]])
    d = torch.tensor([[True], [False]])
    y = td_target(r, d, torch.tensor([[5.0], [5.0]]), 0.9)
    torch.testing.assert_close(y, torch.tensor([[1.0], [5.5]]))


def test_twin_q_is_one_batched_call_and_heads_differ():
    q = linear_twin_q()
    out = q(OBS, ACT)
    assert out.shape == (2, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.tensor([2.5, 1.5]))
    torch.testing.assert_close(q.q1(OBS, ACT), torch.tensor([[2.5]]))
    torch.testing.assert_close(q.min_q(OBS, ACT), torch.tensor([[1.5]]))


def test_critic_loss_by_hand():
    q = linear_twin_q()
    out = TD3CriticLoss()(OBS, ACT, torch.tensor([[2.0]]), q)
    # (2.5 - 2)^2 + (1.5 - 2)^2
    assert out["loss_critic"].item() == pytest.approx(0.5)


def test_critic_target_by_hand_without_smoothing_noise():
    q = linear_twin_q()
    loss = TD3CriticLoss(gamma=0.9, policy_noise=0.0, noise_clip=0.5)

    def actor(s):
        return torch.full_like(s, 0.25)

    y = loss.target(torch.tensor([[1.0]]), torch.tensor([[False]]), torch.tensor([[2.0]]), q, actor)
    # min(Q1, Q2)(s'=2, a'=0.25) = min(4.25, 2.5) = 2.5 ; y = 1 + 0.9 * 2.5
    assert y.item() == pytest.approx(1.0 + 0.9 * 2.5)
    y_term = loss.target(
        torch.tensor([[1.0]]), torch.tensor([[True]]), torch.tensor([[2.0]]), q, actor
    )
    assert y_term.item() == pytest.approx(1.0)


def test_smoothing_noise_is_clipped():
    q = linear_twin_q()
    loss = TD3CriticLoss(gamma=1.0, policy_noise=100.0, noise_clip=0.1)

    def actor(s):
        return torch.zeros(s.shape[0], 1)

    s2 = torch.zeros(1000, 1)
    y = loss.target(torch.zeros(1000, 1), torch.zeros(1000, 1, dtype=torch.bool), s2, q, actor)
    # Q2(0, a') = 0.5 with zero action weight, Q1 = a' in [-0.1, 0.1]: min is Q1 = a'
    assert y.min() >= -0.1 - 1e-6 and y.max() <= 0.1 + 1e-6


def test_value_losses_by_hand():
    q = linear_twin_q()
    v = const_value(2.0)
    out = ValueLoss("expectile", 0.7)(OBS, v, action=ACT, critic_target=q)
    # target min(2.5, 1.5) = 1.5, diff = -0.5 -> (1 - 0.7) * 0.25
    assert out["loss_value"].item() == pytest.approx(0.075)
    out = ValueLoss("bootstrap")(OBS, v, td_target=torch.tensor([[3.0]]))
    assert out["loss_value"].item() == pytest.approx(1.0)


def paired(objective: str = "expectile", **kwargs) -> Advantage:
    adv = Advantage(**kwargs)
    adv.pair_with(objective)
    return adv


def test_advantage_by_hand_for_actions_and_candidates():
    q, v = linear_twin_q(), const_value(2.0)
    assert paired(q_head="q1")(OBS, ACT, q, v).item() == pytest.approx(0.5)
    assert paired(q_head="min")(OBS, ACT, q, v).item() == pytest.approx(-0.5)
    # auto: the pairing's head, min for IQL's expectile V, Q1 for A2PR's bootstrap V
    assert paired("expectile")(OBS, ACT, q, v).item() == pytest.approx(-0.5)
    assert paired("bootstrap")(OBS, ACT, q, v).item() == pytest.approx(0.5)
    cands = torch.tensor([[[0.0], [1.0], [-1.0]]])  # [B=1, N=3, A=1]
    adv = paired(q_head="q1")(OBS, cands, q, v)
    assert adv.shape == (1, 3, 1)
    torch.testing.assert_close(adv.flatten(), torch.tensor([0.0, 1.0, -1.0]))


def test_advantage_pairs_its_critic_with_the_value_objective():
    assert paired("expectile").uses_target_critic is True
    assert paired("bootstrap").uses_target_critic is False
    with pytest.raises(ValueError, match="allow_mismatch"):
        paired("expectile", critic="online")
    with pytest.raises(ValueError, match="allow_mismatch"):
        paired("bootstrap", critic="target")
    assert paired("expectile", critic="online", allow_mismatch=True).uses_target_critic is False
    with pytest.raises(RuntimeError, match="pair_with"):
        Advantage()(OBS, ACT, linear_twin_q(), const_value(2.0))


def test_binary_weight_is_zero_for_non_positive_advantage_by_default():
    w = BinaryWeight()(torch.tensor([[-1.0], [0.0], [1e-6], [3.0]]))
    torch.testing.assert_close(w.flatten(), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    w = BinaryWeight(eta=2.0, base=1.0)(torch.tensor([[-1.0], [0.5]]))
    torch.testing.assert_close(w.flatten(), torch.tensor([1.0, 3.0]))


def test_exp_awr_weight_by_hand():
    w = ExpAWRWeight(beta=1.0, w_max=2.0)(torch.tensor([[0.0], [1.0], [-1.0]]))
    torch.testing.assert_close(w.flatten(), torch.tensor([1.0, 2.0, math.exp(-1.0)]))
    assert UniformWeight()(torch.tensor([[-5.0], [5.0]])).eq(1).all()


@pytest.mark.parametrize("scheme", [BinaryWeight(), ExpAWRWeight(), UniformWeight()])
def test_weighting_contract(scheme):
    adv = torch.randn(4, 7, 1, requires_grad=True)
    w = scheme(adv)
    assert w.shape == adv.shape
    assert (w >= 0).all()
    assert not w.requires_grad
    assert not list(scheme.parameters())


def test_weighted_behavior_loss_reductions_by_hand():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    assert WeightedBehaviorLoss("mean")(loss, w)["loss_behavior"].item() == pytest.approx(1.5)
    assert WeightedBehaviorLoss("weight_normalized")(loss, w)["loss_behavior"].item() == 3.0
    zero = torch.zeros(4, 1)
    for reduction in ("mean", "weight_normalized"):
        out = WeightedBehaviorLoss(reduction)(loss, zero)["loss_behavior"]
        assert out.item() == 0.0 and torch.isfinite(out)


def test_adpo_compare_rule_keeps_dataset_action_exactly_where_it_wins():
    cands = torch.tensor([[[0.1, 0.1], [0.9, 0.9]], [[0.3, 0.3], [-0.5, -0.5]]])
    cand_adv = torch.tensor([[[0.2], [0.5]], [[0.1], [-0.2]]])
    action = torch.tensor([[0.0, -0.3], [0.7, 0.2]])
    act_adv = torch.tensor([[0.4], [0.6]])
    target, mask = ADPOSelector("compare")(cands, cand_adv, action, act_adv)
    # row 0: best candidate (adv 0.5) >= 0.4 -> candidate; row 1: best 0.1 < 0.6 -> dataset
    torch.testing.assert_close(target[0], cands[0, 1])
    assert torch.equal(target[1], action[1])
    assert mask.eq(1).all()
    # tie goes to the generated action (>=)
    target, _ = ADPOSelector("compare")(cands, cand_adv, action, torch.tensor([[0.5], [0.1]]))
    torch.testing.assert_close(target, torch.stack([cands[0, 1], cands[1, 0]]))


def test_adpo_positive_rule_and_three_level_mask():
    cands = torch.tensor([[[0.5, 0.5]], [[-0.5, 0.5]], [[0.2, 0.2]]])
    cand_adv = torch.tensor([[[0.3]], [[0.0]], [[-0.4]]])
    action = torch.tensor([[0.0, 0.0], [0.1, 0.1], [0.9, 0.9]])
    act_adv = torch.tensor([[1.0], [-1.0], [0.2]])
    target, mask = ADPOSelector("positive", "three_level")(cands, cand_adv, action, act_adv)
    torch.testing.assert_close(target[0], cands[0, 0])  # A_gen = 0.3 > 0
    assert torch.equal(target[1], action[1])  # A_gen = 0 is not > 0
    assert torch.equal(target[2], action[2])
    # m = 1[A_gen >= 0] + 1[A_data > 0]
    torch.testing.assert_close(mask.flatten(), torch.tensor([2.0, 1.0, 1.0]))


def test_dataset_selector_returns_dataset_action():
    action = torch.randn(5, 3)
    target, mask = DatasetSelector()(None, None, action)
    assert torch.equal(target, action) and mask.eq(1).all() and mask.shape == (5, 1)


def test_td3bc_actor_loss_by_hand():
    q = linear_twin_q()
    actor = nn.Linear(1, 1)
    with torch.no_grad():
        actor.weight.fill_(0.0)
        actor.bias.fill_(0.5)  # pi(s) = 0.5
    obs = torch.tensor([[1.0], [2.0]])
    target = torch.tensor([[0.0], [1.0]])
    mask = torch.tensor([[1.0], [2.0]])
    out = TD3BCActorLoss(alpha=2.5, bc_weight=3.0)(obs, target, mask, actor, q)
    q1 = torch.tensor([2.5, 4.5])  # 2 s + 0.5
    lam = 2.5 / q1.abs().mean()
    bc = (1 * 0.25 + 2 * 0.25) / 2
    expected = -lam * q1.mean() + 3.0 * bc
    assert out["loss_actor"].item() == pytest.approx(expected.item())
    assert out["lambda"].item() == pytest.approx(lam.item())
    out["loss_actor"].backward()
    assert actor.bias.grad is not None


def test_polyak_update_is_a_lerp():
    target = [torch.zeros(3), torch.ones(2)]
    online = [torch.ones(3), torch.zeros(2)]
    polyak_update(target, online, 0.25)
    torch.testing.assert_close(target[0], torch.full((3,), 0.25))
    torch.testing.assert_close(target[1], torch.full((2,), 0.75))


SELECTORS = {
    "dataset": lambda: DatasetSelector(),
    "adpo_compare": lambda: ADPOSelector("compare", num_candidates=3),
    "adpo_positive_three_level": lambda: ADPOSelector("positive", "three_level", num_candidates=3),
    "resampling_greedy": lambda: ResamplingSelector(num_candidates=3, temperature=0.0),
    "resampling_softmax": lambda: ResamplingSelector(num_candidates=3, temperature=1.0),
}


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_selector_contract(name):
    """Shapes, no parameters, no gradient, and every target is the dataset action or one of
    the candidates (a selector never invents actions)."""
    selector = SELECTORS[name]()
    b, n, a = (4, 5), 3, 2
    cands = torch.rand(*b, n, a) * 2 - 1
    cand_adv = torch.randn(*b, n, 1)
    action = torch.rand(*b, a) * 2 - 1
    act_adv = torch.randn(*b, 1, requires_grad=True)
    target, mask = selector(cands, cand_adv, action, act_adv)
    assert target.shape == (*b, a) and mask.shape == (*b, 1)
    assert (mask >= 0).all() and not target.requires_grad and not mask.requires_grad
    assert not list(selector.parameters())
    is_action = (target == action).all(-1)
    is_cand = (target.unsqueeze(-2) == cands).all(-1).any(-1)
    assert (is_action | is_cand).all()
