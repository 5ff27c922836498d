"""The training step's execution modes: device sampler, compile=default against eager, CUDA
graphs (skipped without CUDA), and the pieces made faster for them (Mish, one-head Q1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from divo.agents.builder import build_agent
from divo.agents.step import DeviceSampler, TrainStep
from divo.behavior_models.backbones import mish
from divo.config import available_recipes, compose_recipe
from divo.errors import ConfigError
from divo.objectives.critic import TwinQ

OBS, ACT, N = 5, 2, 512


def ted(n: int = N, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "observation": torch.randn(n, OBS, generator=g),
            "action": torch.rand(n, ACT, generator=g) * 2 - 1,
            "next": {
                "observation": torch.randn(n, OBS, generator=g),
                "reward": torch.randn(n, 1, generator=g),
                "terminated": torch.rand(n, 1, generator=g) < 0.05,
                "truncated": torch.zeros(n, 1, dtype=torch.bool),
                "done": torch.zeros(n, 1, dtype=torch.bool),
            },
        },
        batch_size=[n],
    )


# every shipped recipe but the consistency model's (its host-side curriculum is refused) and
# those with a learning-rate schedule (IQL, IDQL: refused, see the test below)
LR_SCHEDULED = ("iql", "idql")
GRAPH_RECIPES = [r for r in available_recipes() if r not in ("consistency", *LR_SCHEDULED)]

# Diffusion-QL with its EMA refreshed every 3rd update from update 2, so that a few steps see
# both kinds of its update (with and without the EMA refresh)
DQL_EMA = {"diffusion_ql.ema.start": 2, "diffusion_ql.ema.every": 3}


def small_agent(recipe: str, device="cpu", **overrides):
    extra = [f"{k}={v}" for k, v in overrides.items()]
    if compose_recipe(recipe).get("actor") is not None:
        extra.append("actor.network.hidden=[32,32]")
    cfg = compose_recipe(recipe, ["dataset=bandit", "critic.network.hidden=[32,32]", *extra])
    if cfg.get("value") is not None:
        cfg.value.network.hidden = [32, 32]
    if cfg.get("behavior_model") is not None and "hidden" in cfg.behavior_model:
        cfg.behavior_model.hidden = [32, 32]
    torch.manual_seed(0)
    return build_agent(
        cfg,
        observation_dim=OBS,
        action_dim=ACT,
        obs_mean=torch.zeros(OBS),
        obs_std=torch.ones(OBS),
        device=device,
    )


def test_mish_matches_torch_in_value_and_gradient():
    x = (torch.randn(4000, dtype=torch.float64) * 8).requires_grad_()
    x.data[:4] = torch.tensor([-1e4, -30.0, 30.0, 1e4], dtype=torch.float64)
    ours, ref = mish(x), F.mish(x)
    torch.testing.assert_close(ours, ref)
    g_ours, g_ref = (torch.autograd.grad(y.sum(), x)[0] for y in (ours, ref))
    torch.testing.assert_close(g_ours, g_ref)
    assert torch.autograd.gradcheck(mish, (x[4:40].detach().requires_grad_(),))
    xf = torch.randn(64, 8)
    torch.testing.assert_close(mish(xf), F.mish(xf))
    torch.testing.assert_close(torch.vmap(mish)(xf), F.mish(xf))


def test_q1_is_the_first_head_and_detached_params_get_no_gradient():
    q = TwinQ(OBS, ACT, hidden=(16, 16))
    obs, act = torch.randn(7, OBS), torch.randn(7, ACT, requires_grad=True)
    torch.testing.assert_close(q.q1(obs, act), q(obs, act)[0])
    cand = torch.randn(7, 3, ACT)  # a state broadcast against its candidates
    torch.testing.assert_close(
        q.q1(obs.unsqueeze(1), cand), q(obs.unsqueeze(1).expand(7, 3, OBS), cand)[0]
    )
    q.q1(obs, act, detach_params=True).sum().backward()
    assert act.grad is not None and act.grad.abs().sum() > 0
    assert all(p.grad is None for p in q.parameters())


def test_device_sampler_draws_uniform_batches_and_per_seed_batches():
    data = ted()
    data["index"] = torch.arange(N)
    torch.manual_seed(0)
    sampler = DeviceSampler(data, 64)
    batch = sampler.sample()
    assert batch.batch_size == torch.Size([64])
    torch.testing.assert_close(batch["observation"], data["observation"][batch["index"]])
    counts = torch.bincount(torch.cat([sampler.sample()["index"] for _ in range(400)]), minlength=N)
    assert counts.min() > 0 and counts.float().std() / counts.float().mean() < 0.2
    seeds = DeviceSampler(data, 64, num_seeds=3).sample()
    assert seeds.batch_size == torch.Size([3, 64])
    assert not torch.equal(seeds["index"][0], seeds["index"][1])
    with pytest.raises(ValueError, match="batch_size"):
        DeviceSampler(data, 0)


def test_graph_mode_needs_cuda_and_unknown_modes_are_refused():
    agent = small_agent("td3bc")
    sampler = DeviceSampler(ted(), 32)
    with pytest.raises(ConfigError, match="compile=graph .* use compile=default"):
        TrainStep(agent, sampler.sample, "graph", "cpu")
    with pytest.raises(ConfigError, match="choose one of none, default, graph"):
        TrainStep(agent, sampler.sample, "fast", "cpu")


def run_steps(
    recipe: str, mode: str, steps: int, device="cpu", graph_stages="compiled", **overrides
):
    agent = small_agent(recipe, device, **overrides)
    torch.manual_seed(1)
    sampler = DeviceSampler(ted().to(device), 32)
    step = TrainStep(agent, sampler.sample, mode, device, graph_stages=graph_stages)
    metrics = [step() for _ in range(steps)]
    return agent, metrics


def assert_same_training(eager, fast, metrics_eager, metrics_fast, rtol, atol):
    assert eager.num_updates == fast.num_updates
    for (name, a), (_, b) in zip(
        eager.state_dict().items(), fast.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(b.cpu(), a.cpu(), rtol=rtol, atol=atol, msg=name)
    for m_a, m_b in zip(metrics_eager, metrics_fast, strict=True):
        assert m_a.keys() == m_b.keys()
        for name in m_a:
            torch.testing.assert_close(
                m_b[name].cpu(), m_a[name].cpu(), rtol=rtol, atol=atol, msg=name
            )


def assert_identical_runs(reference, other) -> None:
    """Two runs' (per-step metrics, final tensors) equal bit for bit."""
    (m_ref, s_ref), (m_other, s_other) = reference, other
    assert [m.keys() for m in m_ref] == [m.keys() for m in m_other]
    for a, b in zip(m_ref, m_other, strict=True):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    for name, value in s_ref.items():
        torch.testing.assert_close(s_other[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["divo", "td3bc", "diffusion_ql"])
def test_compiled_step_matches_eager_for_a_hundred_steps(recipe):
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    overrides = DQL_EMA if recipe == "diffusion_ql" else {}
    torch._dynamo.reset()
    counters.clear()
    eager, m_eager = run_steps(recipe, "none", 100, **overrides)
    assert not counters["frames"]  # the reference really is eager
    # inductor draws its own random numbers unless told to use eager's: same stream here
    with inductor_config.patch(fallback_random=True):
        fast, m_fast = run_steps(recipe, "default", 100, **overrides)
    # every stage compiled whole: one graph each, no graph breaks
    stages = 5 if recipe == "divo" else 2
    assert counters["stats"]["unique_graphs"] == stages and not counters["graph_break"]
    assert_same_training(eager, fast, m_eager, m_fast, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "recipe, graph_stages",
    [(r, "eager") for r in GRAPH_RECIPES]
    + [(r, "compiled") for r in ("divo", "td3bc", "diffusion_ql")],
)
def test_cuda_graph_step_matches_eager_for_a_hundred_steps(recipe, graph_stages):
    # eager: the same kernels, replayed; compiled: inductor's fused kernels (drawing eager's
    # random numbers), replayed: float rounding differs
    import torch._inductor.config as inductor_config

    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()
    overrides = DQL_EMA if recipe == "diffusion_ql" else {}
    eager, m_eager = run_steps(recipe, "none", 100, "cuda", **overrides)
    with inductor_config.patch(fallback_random=True):
        fast, m_fast = run_steps(recipe, "graph", 100, "cuda", graph_stages, **overrides)
    assert_same_training(eager, fast, m_eager, m_fast, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", ["divo", "diffusion_ql"])
def test_cuda_graph_step_of_stacked_seeds_matches_eager(recipe):
    import torch._inductor.config as inductor_config

    from divo.agents.vectorized import VectorizedAgent

    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()
    overrides = DQL_EMA if recipe == "diffusion_ql" else {}
    finals = []
    for mode in ("none", "graph"):  # graph: the compiled vmapped stages, captured
        agents = [small_agent(recipe, "cuda", **overrides) for _ in range(3)]
        vec = VectorizedAgent(agents, recipe)
        torch.manual_seed(1)
        sampler = DeviceSampler(ted().to("cuda"), 32, num_seeds=3)
        step = TrainStep(vec, sampler.sample, mode, "cuda")
        with inductor_config.patch(fallback_random=True):  # eager's random numbers
            metrics = [step()["loss_critic"].clone() for _ in range(60)]
        if mode == "graph":
            assert step.compiled_stages and not step.uncompiled_stages
        assert metrics[-1].shape == (3,)
        finals.append(({k: v.detach().cpu() for k, v in vec.tensors.items()}, metrics))
    (eager, m_eager), (graph, m_graph) = finals
    for name, value in eager.items():
        torch.testing.assert_close(graph[name], value, rtol=1e-3, atol=1e-4, msg=name)
    torch.testing.assert_close(torch.stack(m_graph), torch.stack(m_eager), rtol=1e-3, atol=1e-4)


def test_graph_mode_is_refused_before_training_starts_on_a_cpu(tmp_path):
    from divo.agents.train import train

    cfg = compose_recipe("td3bc", ["dataset=bandit", "compile=graph", "device=cpu"])
    with pytest.raises(ConfigError, match="compile=graph captures CUDA graphs"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", available_recipes())
def test_eager_cuda_step_never_syncs_with_the_host(recipe):
    agent = small_agent(recipe, "cuda", **(DQL_EMA if recipe == "diffusion_ql" else {}))
    sampler = DeviceSampler(ted().to("cuda"), 32)
    step = TrainStep(agent, sampler.sample, "none", "cuda")
    step()  # first step: optimiser states are created
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        for _ in range(4):  # critic-only and actor steps
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_checkpoint_keeps_how_the_resuming_optimisers_run():
    """A foreach-Adam checkpoint resumed by fused-Adam agent (or the reverse) loads the state
    and keeps the resuming run's execution options, and training goes on."""
    sampler = DeviceSampler(ted(), 32)
    saved = small_agent("td3bc", **{"optim.adam.foreach": "true"})
    for _ in range(3):
        saved.update(sampler.sample())
    state = saved.training_state()
    agent = small_agent("td3bc")
    assert agent.optimizers["critic"].param_groups[0]["fused"]
    agent.load_training_state(state)
    for name, opt in agent.optimizers.items():
        group = opt.param_groups[0]
        assert group["fused"] and not group.get("foreach"), name
        p = group["params"][0]
        torch.testing.assert_close(
            opt.state[p]["exp_avg"],
            saved.optimizers[name].state[saved_param(saved, name)]["exp_avg"],
        )
    agent.update(sampler.sample())
    back = small_agent("td3bc", **{"optim.adam.foreach": "true"})
    back.load_training_state(agent.training_state())
    assert back.optimizers["actor"].param_groups[0]["foreach"]
    back.update(sampler.sample())


def saved_param(agent, name):
    return agent.optimizers[name].param_groups[0]["params"][0]


@pytest.mark.parametrize(
    "recipe, overrides",
    [("divo", {}), ("td3bc", {}), ("resampling", {"selector.temperature": 1.0})],
)
def test_an_explicit_generator_drives_every_random_draw_of_the_update(recipe, overrides):
    """update(batch, generator): same generator seed -> same update, whatever the global RNG
    (the resampling selector's softmax pick drew from the global stream)."""
    batches = [DeviceSampler(ted(), 32).sample() for _ in range(4)]
    states = []
    for global_seed in (11, 12):
        agent = small_agent(recipe, **overrides)
        torch.manual_seed(global_seed)  # a different global stream each time
        g = torch.Generator().manual_seed(5)
        for batch in batches:
            agent.update(batch, generator=g)
        states.append(agent.state_dict())
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, msg=name)


class _ReplayedStep:
    """Stands in for a CUDA graph on a CPU: replay() runs the recorded kind of step again (the
    Python step counter as it was at capture, then put back: a replay runs no Python) and
    writes its results into the tensors the capture returned (a graph's static outputs)."""

    def __init__(self, agent, step, outputs):
        self.agent, self.step, self.outputs = agent, step, outputs
        self.counter_at_capture = agent.num_updates

    def replay(self):
        counter = self.agent.num_updates
        self.agent.num_updates = self.counter_at_capture
        for name, value in self.step().items():
            self.outputs[name].copy_(value)
        self.agent.num_updates = counter


class _CPUGraphStep(TrainStep):
    """TrainStep's graph mode with its three CUDA calls replaced: what remains is the logic
    (warm-up count, which graph a step replays, the step counter, the static outputs)."""

    def _warmup_step(self):
        return self._eager()

    def _record(self, step):
        import copy

        # a capture records kernels without running them: run the step, then undo it
        agent = self.agent
        tensors = getattr(agent, "tensors", None) or dict(agent.state_dict(keep_vars=True))
        saved = {name: value.detach().clone() for name, value in tensors.items()}
        optimizers = {n: copy.deepcopy(o.state_dict()) for n, o in agent.optimizers.items()}
        rng = torch.get_rng_state()
        graph = _ReplayedStep(agent, step, {})
        graph.outputs = {name: value.clone() for name, value in step().items()}
        with torch.no_grad():
            for name, value in tensors.items():
                value.copy_(saved[name])
        for name, opt in agent.optimizers.items():
            opt.load_state_dict(optimizers[name])
        torch.set_rng_state(rng)
        return graph, graph.outputs


@pytest.mark.parametrize(
    "recipe, stacked",
    [(r, False) for r in GRAPH_RECIPES] + [(r, True) for r in ("divo", "td3bc", "diffusion_ql")],
)
def test_graph_mode_logic_replays_the_right_step_kind(recipe, stacked):
    from divo.agents.vectorized import VectorizedAgent

    overrides = DQL_EMA if recipe == "diffusion_ql" else {}
    runs = []
    for step_class, mode in ((TrainStep, "none"), (_CPUGraphStep, "graph")):
        agent = small_agent(recipe, **overrides)
        if stacked:
            agent = VectorizedAgent([agent, small_agent(recipe, **overrides)], recipe)
        torch.manual_seed(1)
        sampler = DeviceSampler(ted(), 32, num_seeds=2 if stacked else None)
        # the device only has to say "cuda" to pass the mode check; the calls are replaced
        device = "cuda" if mode == "graph" else "cpu"
        step = step_class(agent, sampler.sample, mode, device, graph_stages="eager")
        metrics = [{k: v.clone() for k, v in step().items()} for _ in range(11)]
        state = agent.tensors if stacked else agent.state_dict()
        runs.append((agent.num_updates, metrics, {k: v.clone() for k, v in state.items()}))
    # one recorded step per kind: critic-only / with actor (Diffusion-QL: without / with EMA;
    # FQL: one kind, its actor steps every update)
    assert set(step._graphs) == ({True} if recipe == "fql" else {False, True})
    (n_eager, *eager), (n_graph, *graph) = runs
    assert n_eager == n_graph == 11
    assert_identical_runs(eager, graph)  # metric keys too: the actor every 2nd step


@pytest.mark.parametrize(
    "value, v_from",
    [("expectile", "value_step"), ("expectile", "updated"), ("bootstrap", "value_step")],
)
def test_advantages_use_the_critic_their_value_is_fitted_to(value, v_from):
    """A(s, a) = Q(s, a) - V(s) with the critic V is fitted to: expectile V (IQL) -> min over
    the TARGET critic's heads; bootstrap V (A2PR) -> Q1 of the online critic this step updated.
    V(s) of the value step's own forward pass, or evaluated again after the value's update."""
    import copy

    agent = small_agent("divo", value=value, **{"value.advantage.v_from": v_from})
    batch = DeviceSampler(ted(), 64).sample()
    value_before = copy.deepcopy(agent.value)
    metrics = agent.update(batch)  # update 1: critic, value, behaviour model (no actor yet)
    with torch.no_grad():
        obs = agent.normalizer(batch["observation"])
        if value == "expectile":
            q = agent.critic_target.min_q(obs, batch["action"])
            assert not torch.allclose(q, agent.critic.min_q(obs, batch["action"]))
        else:
            q = agent.critic.q1(obs, batch["action"])
        v_before, v_after = value_before(obs), agent.value(obs)
    assert not torch.allclose(v_before, v_after)  # the value step moved V
    v = v_before if v_from == "value_step" else v_after
    torch.testing.assert_close(metrics["advantage_mean"], (q - v).mean())
    torch.testing.assert_close(metrics["advantage_pos_frac"], (q > v).float().mean())


@pytest.mark.parametrize("recipe", ["divo", "iql"])
def test_reusing_the_value_steps_target_q_changes_no_number(recipe, monkeypatch):
    """Under IQL's pairing the dataset actions' Q(s, a) is V's own target, min Q_target(s, a),
    from the value step (the target critic moves only after the actor): reusing it instead of
    a second twin-Q pass gives the same training, bit for bit."""

    def train(reuse: bool):
        agent = small_agent(recipe)
        assert agent._reuse_target_q
        agent._reuse_target_q = reuse
        calls = []
        min_q = type(agent.critic_target).min_q

        def counted(self, *args):
            calls.append(self is agent.critic_target)
            return min_q(self, *args)

        monkeypatch.setattr(type(agent.critic_target), "min_q", counted)
        torch.manual_seed(1)
        sampler = DeviceSampler(ted(), 32)
        metrics = [agent.update(sampler.sample()) for _ in range(6)]
        monkeypatch.undo()
        return (metrics, agent.state_dict()), sum(calls)

    (reused, target_passes), (recomputed, target_passes_again) = train(True), train(False)
    assert_identical_runs(recomputed, reused)
    assert target_passes_again - target_passes == 6  # one pass of the target critic per step


@pytest.mark.parametrize("overrides", [{"value": "bootstrap"}, {"value.advantage.q_head": "q1"}])
def test_the_value_steps_target_q_is_reused_only_when_it_is_the_advantages_q(overrides):
    assert not small_agent("divo", **overrides)._reuse_target_q


@pytest.mark.parametrize("value, other", [("expectile", "online"), ("bootstrap", "target")])
def test_a_mismatched_advantage_critic_is_refused_unless_asked_for(value, other):
    """Online Q minus a V fitted to the target critic (or the reverse) builds the Polyak lag
    into every advantage: refused with a one-line error; allowed by name as an ablation."""
    with pytest.raises(ConfigError, match="allow_mismatch"):
        small_agent("divo", value=value, **{"value.advantage.critic": other})
    agent = small_agent(
        "divo",
        value=value,
        **{"value.advantage.critic": other, "value.advantage.allow_mismatch": "true"},
    )
    assert agent.advantage_critic is (agent.critic if other == "online" else agent.critic_target)


def test_a_stage_that_fails_to_compile_runs_eagerly_after_a_warning():
    """compile=graph's fallback: the first call of a wrapped stage fails -> reported once, and
    that stage runs as written from then on (the update equals the eager one)."""
    from divo.agents.agent import EagerStages

    def broken_compile(stage):
        def compiled(*args):
            raise RuntimeError("inductor: no C++ compiler\nmore detail")

        return compiled

    reported = []
    runs = []
    for stages_of in (EagerStages, None):
        agent = small_agent("divo")
        torch.manual_seed(1)
        sampler = DeviceSampler(ted(), 32)
        if stages_of is None:
            metrics = [agent.update(sampler.sample()) for _ in range(4)]
        else:
            stages = stages_of(
                agent, wrap=broken_compile, on_wrap_error=lambda n, e: reported.append(n)
            )
            metrics = [agent.run_update(sampler.sample(), stages) for _ in range(4)]
        runs.append((metrics, agent.state_dict()))
    # each stage reported once, at its first call (the actor's at update 2)
    stage_names = ["critic_stage", "value_stage", "target_q_advantage_stage", "behavior_stage"]
    assert reported == [*stage_names, "actor_stage"]
    assert_identical_runs(runs[1], runs[0])
    # what a TrainStep reports: nothing compiled on the eager path
    eager_step = TrainStep(small_agent("td3bc"), DeviceSampler(ted(), 32).sample, "none")
    eager_step()
    assert eager_step.compiled_stages == eager_step.uncompiled_stages == []
    # without a handler, the error is the caller's
    agent = small_agent("td3bc")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        agent.run_update(DeviceSampler(ted(), 32).sample(), EagerStages(agent, broken_compile))


@pytest.mark.parametrize("recipe", LR_SCHEDULED)
def test_graph_mode_refuses_a_learning_rate_schedule_in_one_line(recipe):
    """A CUDA graph replays the learning rate it recorded: a schedule is refused by name (the
    device only has to say "cuda" to reach the check); without the schedule the mode applies."""
    agent = small_agent(recipe)
    sampler = DeviceSampler(ted(), 32)
    with pytest.raises(ConfigError, match=r"learning-rate schedule \(behavior\).*compile=default"):
        TrainStep(agent, sampler.sample, "graph", "cuda")
    plain = small_agent(recipe, **{"behavior.lr_schedule": "null"})
    TrainStep(plain, sampler.sample, "graph", "cuda", graph_stages="eager")


def test_bad_graph_stages_are_refused():
    agent = small_agent("td3bc")
    with pytest.raises(ConfigError, match="graph_stages='fused' .* compiled, eager"):
        TrainStep(agent, DeviceSampler(ted(), 32).sample, "graph", "cuda", graph_stages="fused")


@pytest.mark.slow
def test_graph_mode_captures_the_compiled_stages():
    """graph_stages=compiled: the steps recorded (CUDA calls replaced, as in the logic test
    above) run the torch.compile'd stages, equal bit for bit to compile=default's steps."""
    import torch._inductor.config as inductor_config

    runs = []
    with inductor_config.patch(fallback_random=True):
        for step_class, mode in ((TrainStep, "default"), (_CPUGraphStep, "graph")):
            torch._dynamo.reset()
            agent = small_agent("td3bc")
            torch.manual_seed(1)
            sampler = DeviceSampler(ted(), 32)
            device = "cuda" if mode == "graph" else "cpu"
            step = step_class(agent, sampler.sample, mode, device, graph_stages="compiled")
            metrics = [{k: v.clone() for k, v in step().items()} for _ in range(9)]
            runs.append((metrics, {k: v.clone() for k, v in agent.state_dict().items()}))
            if mode == "graph":
                assert step._stages is not None and set(step._graphs) == {False, True}
                assert step.compiled_stages == ["actor_stage", "critic_stage"]
                assert step.uncompiled_stages == []
    assert_identical_runs(*runs)


def test_each_executor_compiles_its_own_copy_of_a_stage():
    """torch.compile caches per code object (8 entries by default): each executor's stages get
    their own, so many agents compiled in one process (a multirun) never share one budget."""
    from divo.agents.agent import EagerStages

    codes = []

    def record(fn):
        codes.append(fn.__code__)
        return fn

    batch = DeviceSampler(ted(), 32).sample()
    for _ in range(2):
        agent = small_agent("td3bc")
        agent.run_update(batch, EagerStages(agent, wrap=record))
    assert len(codes) == 2 and codes[0] is not codes[1]
    assert codes[0].co_name == "critic_stage"


@pytest.fixture
def no_host_reads(monkeypatch):
    """Tensor methods that read values on the host (a device sync on a GPU) raise: the CPU
    stand-in for the GPU test that runs the eager CUDA step under sync debug mode (it catches
    Python-level reads; syncs inside ATen, e.g. torch.multinomial's check, only a GPU shows)."""

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"the update read a tensor on the host: Tensor.{name}")

        return method

    def apply():
        for name in ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__",
                     "__float__", "__index__"):  # fmt: skip
            monkeypatch.setattr(torch.Tensor, name, refuse(name))

    return apply


@pytest.mark.parametrize("recipe", available_recipes())
def test_no_update_reads_a_tensor_on_the_host(recipe, no_host_reads):
    agent = small_agent(recipe, **(DQL_EMA if recipe == "diffusion_ql" else {}))
    step = TrainStep(agent, DeviceSampler(ted(), 32).sample, "none", "cpu")
    step()  # first step: optimiser states (and the consistency model's level cache) are made
    no_host_reads()
    for _ in range(4):  # critic-only and actor steps (Diffusion-QL: with and without EMA)
        step()


def test_graph_mode_falls_back_to_eager_kernels_where_compiling_fails(monkeypatch, caplog):
    """Through TrainStep (CUDA calls replaced): every stage fails to compile -> one warning per
    stage, the graphs record the eager stages, and training equals the eager path."""
    import divo.agents.step as step_module

    def broken_compile(stage):
        def compiled(*args):
            raise RuntimeError("BackendCompilerFailed: no working C++ compiler")

        return compiled

    monkeypatch.setattr(step_module, "_compile", broken_compile)
    runs = []
    for step_class, mode in ((TrainStep, "none"), (_CPUGraphStep, "graph")):
        agent = small_agent("divo")
        torch.manual_seed(1)
        sampler = DeviceSampler(ted(), 32)
        device = "cuda" if mode == "graph" else "cpu"
        step = step_class(agent, sampler.sample, mode, device)  # graph_stages: compiled
        with caplog.at_level("WARNING", logger="divo.train"):
            metrics = [{k: v.clone() for k, v in step().items()} for _ in range(7)]
        runs.append((metrics, {k: v.clone() for k, v in agent.state_dict().items()}))
    assert step.compiled_stages == []
    assert step.uncompiled_stages == sorted(
        ["critic_stage", "value_stage", "target_q_advantage_stage", "behavior_stage", "actor_stage"]
    )
    warned = [r.getMessage() for r in caplog.records if "could not be compiled" in r.getMessage()]
    assert len(warned) == 5 and "no working C++ compiler" in warned[0]
    assert_identical_runs(*runs)
