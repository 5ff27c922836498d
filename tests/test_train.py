"""End to end: `divo train` / `divo evaluate` on the bandit and a small local Hopper dataset,
run files, multirun, a user-supplied TorchRL replay buffer, and one-line errors."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from torchrl.data import LazyMemmapStorage, LazyTensorStorage, TensorDictReplayBuffer

from divo.agents.train import train
from divo.cli import main
from divo.config import compose_recipe
from divo.data.batches import buffer_observation_stats
from divo.data.load import load_offline_data
from divo.errors import ConfigError, DatasetError, DivoError, install_hint

FAST = [
    "--quiet",
    "train.steps=6",
    "train.eval_every=3",
    "train.log_every=2",
    "train.checkpoint_every=3",
    "train.eval_episodes=2",
    "train.batch_size=32",
]
RESULT_KEYS = {
    "recipe",
    "dataset_id",
    "seed",
    "steps",
    "return_mean",
    "return_std",
    "normalized_score",
    "episodes",
    "data_fingerprint",
    "wall_clock_s",
    "device",
    "critic_overestimation",
    "data_level",
    "below_data_level",
}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def dataset_overrides(name: str, hopper_dataset: str) -> list[str]:
    if name == "hopper":
        return ["dataset=minari", f"dataset.id={hopper_dataset}"]
    if name == "default":  # the recipes' own default: the shipped Hopper-v5 medium-replay data
        return []
    return ["dataset=bandit"]


@pytest.mark.parametrize("dataset", ["bandit", "hopper", "default"])
@pytest.mark.parametrize("recipe", ["divo", "soft_weight", "td3bc"])
def test_train_writes_the_run_files(recipe, dataset, hopper_dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", recipe, *FAST, *dataset_overrides(dataset, hopper_dataset)]
    code, out, err = run_cli([*args, f"hydra.run.dir={run_dir}"], capsys)
    assert code == 0, err
    assert "normalized score" in out
    assert (run_dir / "config.yaml").is_file()
    result = json.loads((run_dir / "result.json").read_text())
    assert RESULT_KEYS <= set(result)
    assert result["recipe"] == recipe and result["steps"] == 6 and result["episodes"] == 2
    assert isinstance(result["normalized_score"], float)
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2, 3, 4, 6]  # 0: train.eval_at_start
    header = set(rows[0])
    assert {"loss_critic", "loss_actor", "eval_return_mean", "normalized_score"} <= header
    # the critic against the returns its evaluation rollouts earned
    assert {"eval_q", "eval_return_to_go", "eval_q_bias"} <= header
    final = rows[-1]
    assert float(final["eval_q_bias"]) == pytest.approx(
        float(final["eval_q"]) - float(final["eval_return_to_go"]), abs=1e-4
    )
    if recipe != "td3bc":
        assert {"loss_value", "loss_behavior", "advantage_pos_frac", "weight_mean"} <= header
    assert rows[-1]["normalized_score"] != ""
    # the data-level guard: each evaluation after step 0 below half the data's level is listed
    # and logged; none is listed without a level
    level = result["data_level"]
    low = [
        int(r["step"])
        for r in rows
        if int(r["step"]) > 0
        and r["normalized_score"]
        and level is not None
        and float(r["normalized_score"]) < 0.5 * level
    ]
    assert [a["step"] for a in result["below_data_level"]] == low
    log = (run_dir / "train.log").read_text()
    assert log.count("below half its data's own level") == len(low)
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert [c.name for c in ckpts] == ["step_000000003.pt", "step_000000006.pt"]
    assert (run_dir / "policy.pt").is_file()


def test_evaluate_reproduces_the_final_evaluation(tmp_path, capsys, hopper_dataset):
    run_dir = tmp_path / "run"
    args = ["train", "td3bc", *FAST, *dataset_overrides("hopper", hopper_dataset)]
    assert run_cli([*args, f"hydra.run.dir={run_dir}"], capsys)[0] == 0
    result = json.loads((run_dir / "result.json").read_text())
    code, out, err = run_cli(["evaluate", str(run_dir), "--episodes", "2", "--json"], capsys)
    assert code == 0, err
    again = json.loads(out)
    # same policy, same env seeds (seed + 100) -> same returns
    assert again["return_mean"] == pytest.approx(result["return_mean"])
    assert again["normalized_score"] == pytest.approx(result["normalized_score"])
    # a checkpoint file works as well
    ckpt = sorted((run_dir / "checkpoints").glob("*.pt"))[-1]
    code, out, _ = run_cli(["evaluate", str(ckpt), "--episodes", "1"], capsys)
    assert code == 0 and "normalized score" in out


def test_evaluate_critic_repeats_the_training_time_check(tmp_path, capsys, hopper_dataset):
    """``divo evaluate <checkpoint> --critic`` with the run's evaluation seed and episodes gives
    the critic check its last evaluation logged; a policy.pt (no critic) is refused."""
    run_dir = tmp_path / "run"
    args = ["train", "divo", *FAST, *dataset_overrides("hopper", hopper_dataset)]
    assert run_cli([*args, f"hydra.run.dir={run_dir}"], capsys)[0] == 0
    with (run_dir / "metrics.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    cmd = ["evaluate", str(run_dir), "--critic", "--episodes", "2", "--seed", "100"]
    code, out, err = run_cli([*cmd, "--json"], capsys)
    assert code == 0, err
    again = json.loads(out)
    assert again["step"] == 6 and again["recipe"] == "divo"
    assert again["return_mean"] == pytest.approx(float(last["eval_return_mean"]))
    for key in ("eval_q", "eval_return_to_go", "eval_q_bias"):
        assert again["critic"][key] == pytest.approx(float(last[key]), rel=1e-5, abs=1e-5)
    code, out, _ = run_cli(cmd, capsys)
    assert code == 0 and "on the policy's own steps (Q - return" in out
    code, _, err = run_cli(["evaluate", str(run_dir / "policy.pt"), "--critic"], capsys)
    assert code != 0 and "needs one" in err


def test_multirun_runs_every_job(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = ["train", "td3bc", "-m", "seed=0,1", *FAST, "dataset=bandit", f"hydra.sweep.dir={sweep}"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    results = sorted(sweep.rglob("result.json"))
    assert len(results) == 2
    assert {json.loads(p.read_text())["seed"] for p in results} == {0, 1}


def cfg_overrides() -> list[str]:
    """FAST as Python-API overrides (no --quiet flag)."""
    return [*[o for o in FAST if o != "--quiet"], "train.progress=false"]


def test_user_replay_buffer_through_the_python_api(hopper_dataset, tmp_path):
    data = load_offline_data(hopper_dataset)
    rb = TensorDictReplayBuffer(
        storage=LazyMemmapStorage(data.num_transitions, scratch_dir=tmp_path / "mm"),
        batch_size=32,
    )
    rb.extend(data.data)
    cfg = compose_recipe(
        "divo", [*cfg_overrides(), "dataset=minari", f"dataset.id={hopper_dataset}"]
    )
    result = train(cfg, tmp_path / "run", replay_buffer=rb)
    assert result["steps"] == 6 and result["normalized_score"] is not None
    # scored against D4RL's Hopper references (the data store none), recorded as such
    assert (result["ref_min_score"], result["ref_max_score"]) == (-20.272305, 3234.3)
    assert result["ref_source"] == "D4RL Hopper-v2"
    assert "reference returns from D4RL Hopper-v2" in (tmp_path / "run" / "train.log").read_text()
    # without a dataset id, the observation statistics come from the buffer's contents
    stats = buffer_observation_stats(rb)
    torch.testing.assert_close(stats[0], data.obs_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[1], data.obs_std, rtol=1e-5, atol=1e-5)
    no_id = compose_recipe("divo", [*cfg_overrides(), "dataset=minari", "dataset.id=null"])
    result = train(no_id, tmp_path / "no-id", replay_buffer=rb)
    assert result["steps"] == 6 and result["normalized_score"] is None
    saved = torch.load(tmp_path / "no-id" / "policy.pt", weights_only=False)["state_dict"]
    torch.testing.assert_close(saved["normalizer.mean"], stats[0])
    torch.testing.assert_close(saved["normalizer.std"], stats[1])
    # a buffer whose samples lack TED keys is refused with the missing key named
    bad = TensorDictReplayBuffer(storage=LazyMemmapStorage(100))  # sampled at train.batch_size
    bad.extend(data.data[:100].exclude(("next", "reward")))
    with pytest.raises(DatasetError, match="reward"):
        train(cfg, tmp_path / "bad", replay_buffer=bad)
    # ... and one with observations of another shape, naming the shape expected
    odd = TensorDictReplayBuffer(storage=LazyMemmapStorage(100))
    flat = data.data[:100].clone()
    flat.set(("next", "observation"), flat["next", "observation"][:, :-1])
    odd.extend(flat)
    with pytest.raises(DatasetError, match=r"next/observation of shape \(32, 10\).*\(32, 11\)"):
        train(cfg, tmp_path / "odd", replay_buffer=odd)


def test_obs_stats_given_are_the_ones_the_policy_normalises_with(hopper_dataset, tmp_path):
    """obs_stats take the place of the dataset's statistics (they were dropped without a word
    when dataset.id was set); of the wrong size, or for a recipe on raw observations, they are
    refused before anything is written."""
    data = load_offline_data(hopper_dataset)
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(data.num_transitions), batch_size=32)
    rb.extend(data.data)
    cfg = compose_recipe(
        "td3bc", [*cfg_overrides(), "dataset=minari", f"dataset.id={hopper_dataset}"]
    )
    mean, std = torch.zeros(11), torch.full((11,), 1000.0)
    for name, buffer in (("with-buffer", rb), ("dataset-only", None)):
        train(cfg, tmp_path / name, replay_buffer=buffer, obs_stats=(mean, std))
        saved = torch.load(tmp_path / name / "policy.pt", weights_only=False)["state_dict"]
        torch.testing.assert_close(saved["normalizer.std"], std)
        assert "obs_stats given (not those of" in (tmp_path / name / "train.log").read_text()
    with pytest.raises(ConfigError, match=r"obs_stats has sizes \(10,\) and \(11,\).*\(11,\)"):
        train(cfg, tmp_path / "wrong", obs_stats=(torch.zeros(10), std))
    raw = compose_recipe(
        "td3bc",
        [*cfg_overrides(), "dataset=minari", f"dataset.id={hopper_dataset}",
         "normalize_observations=false"],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="normalize_observations=false"):
        train(raw, tmp_path / "raw", obs_stats=(mean, std))
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "raw").exists()


def test_a_users_buffer_is_fingerprinted_and_a_resume_on_other_contents_refused(
    hopper_dataset, tmp_path
):
    """A run fed from a user's replay buffer records the fingerprint of what the buffer stores;
    resumed with a buffer whose rewards were changed, it is refused; with the same contents
    (a new buffer object) it resumes."""
    from divo.data.batches import buffer_fingerprint
    from divo.errors import CheckpointError

    data = load_offline_data(hopper_dataset)

    def buffer(td):
        rb = TensorDictReplayBuffer(storage=LazyTensorStorage(len(td)), batch_size=32)
        rb.extend(td)
        return rb

    cfg = compose_recipe(
        "td3bc", [*cfg_overrides(), "dataset=minari", f"dataset.id={hopper_dataset}"]
    )
    run = tmp_path / "run"
    result = train(cfg, run, replay_buffer=buffer(data.data))
    fingerprint = result["data_fingerprint"]
    assert fingerprint.startswith("sha256-buffer:") and fingerprint != data.fingerprint
    log = (run / "train.log").read_text()  # the log names the fingerprint result.json records
    assert f"replay buffer: {len(data.data)} transitions, fingerprint {fingerprint}" in log
    assert buffer_fingerprint(buffer(data.data.clone())) == fingerprint  # contents, not object
    changed = data.data.clone()
    changed.set(("next", "reward"), changed["next", "reward"] * 2)
    assert buffer_fingerprint(buffer(changed)) != fingerprint
    longer = compose_recipe(
        "td3bc",
        [*cfg_overrides(), "dataset=minari", f"dataset.id={hopper_dataset}", "train.steps=8"],
    )
    with pytest.raises(CheckpointError, match="other data than the replay buffer given holds"):
        train(longer, run, replay_buffer=buffer(changed))
    assert train(longer, run, replay_buffer=buffer(data.data))["steps"] == 8


def test_user_replay_buffer_with_flat_rewards_and_flags_trains_as_ted(hopper_dataset, tmp_path):
    """Rewards and flags stored as [N] (not TED's [N, 1]) train exactly as [N, 1] ones: they
    used to broadcast the TD error to [B, B] without a word."""
    data = load_offline_data(hopper_dataset)
    flat = data.data.clone()
    for key in (("next", k) for k in ("reward", "terminated", "truncated", "done")):
        flat.set(key, flat[key].squeeze(-1))
    cfg = compose_recipe(
        "td3bc", [*cfg_overrides(), "dataset=minari", f"dataset.id={hopper_dataset}"]
    )
    saved = {}
    for name, content in (("ted", data.data), ("flat", flat)):
        rb = TensorDictReplayBuffer(storage=LazyTensorStorage(len(content)), batch_size=32)
        rb.extend(content)
        train(cfg, tmp_path / name, replay_buffer=rb)
        saved[name] = torch.load(tmp_path / name / "policy.pt", weights_only=False)["state_dict"]
    for key, value in saved["ted"].items():
        torch.testing.assert_close(saved["flat"][key], value, rtol=0, atol=0)


def test_a_users_buffer_gets_the_recipes_reward_transform_as_a_dataset_does(
    hopper_dataset, tmp_path
):
    """IQL's recipe rescales rewards so that max - min episode return is 1000
    (return_range=locomotion): a buffer of the environment's rewards is trained on through the
    same transform, so it trains as a buffer of the rescaled rewards does with the transform off
    (it used to train on the raw rewards while train.log said they were rescaled). Float64 and
    flat storage convert as a dataset's do; a 1-D action is refused with the shape wanted."""
    from divo.errors import ConfigError

    raw = load_offline_data(hopper_dataset)
    scaled = load_offline_data(hopper_dataset, return_range="locomotion")
    assert scaled.reward_factor != 1.0

    def buffer(td):
        rb = TensorDictReplayBuffer(storage=LazyTensorStorage(len(td)), batch_size=32)
        rb.extend(td)
        return rb

    base = [*cfg_overrides(), "dataset=minari", f"dataset.id={hopper_dataset}"]
    iql = compose_recipe("iql", base)
    assert iql.dataset.return_range == "locomotion"
    train(iql, tmp_path / "raw", replay_buffer=buffer(raw.data))
    off = compose_recipe("iql", [*base, "dataset.return_range=null"])
    train(off, tmp_path / "scaled", replay_buffer=buffer(scaled.data))
    doubles = raw.data.clone()
    for key in ("observation", "action", ("next", "observation"), ("next", "reward")):
        doubles.set(key, doubles.get(key).double())
    train(iql, tmp_path / "float64", replay_buffer=buffer(doubles))

    def critic(name: str) -> dict:  # the last checkpoint's networks (the Q and V the rewards set)
        ckpt = torch.load(tmp_path / name / "checkpoints" / "step_000000006.pt", weights_only=False)
        return dict(ckpt["agent"]["modules"])

    saved = {name: critic(name) for name in ("raw", "scaled", "float64")}
    assert any("critic" in key for key in saved["raw"])
    for key, value in saved["scaled"].items():
        torch.testing.assert_close(saved["raw"][key], value, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(saved["float64"][key], saved["raw"][key], rtol=0, atol=0)
    log = (tmp_path / "raw" / "train.log").read_text()
    assert f"trained on as {scaled.reward_factor:.6g} r +0" in log
    # without a dataset id there are no episode returns to rescale by: refused, in one line
    no_id = compose_recipe("iql", [*cfg_overrides(), "dataset=minari", "dataset.id=null"])
    with pytest.raises(ConfigError, match="dataset.return_range=null"):
        train(no_id, tmp_path / "no-id", replay_buffer=buffer(raw.data))
    assert not (tmp_path / "no-id" / "config.yaml").exists()
    one_d = raw.data[:200].clone()
    one_d.set("action", one_d["action"][:, 0])
    with pytest.raises(DatasetError, match=r"action of shape \(32,\).*\[B, A\]"):
        train(compose_recipe("td3bc", base), tmp_path / "1d", replay_buffer=buffer(one_d))


def _one_line_error(args, capsys) -> str:
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("divo: error: ")
    return lines[0]


def test_unknown_recipe_gives_one_line(capsys):
    line = _one_line_error(["train", "divoo"], capsys)
    assert "unknown recipe 'divoo'" in line and "td3bc" in line


def test_mistyped_dataset_id_gives_one_line(hopper_dataset, tmp_path, capsys):
    line = _one_line_error(
        [
            "train",
            "td3bc",
            *FAST,
            "dataset=minari",
            "dataset.id=test/hoper/random-v0",
            "dataset.download=false",
            f"hydra.run.dir={tmp_path}",
        ],
        capsys,
    )
    assert "test/hoper/random-v0" in line and hopper_dataset in line


def test_bad_step_count_gives_one_line(tmp_path, capsys):
    line = _one_line_error(
        [
            "train",
            "td3bc",
            "--quiet",
            "dataset=bandit",
            "train.steps=0",
            f"hydra.run.dir={tmp_path}",
        ],
        capsys,
    )
    assert "train.steps" in line


@pytest.mark.slow
def test_divo_settles_on_the_best_paying_bandit_mode_and_td3bc_does_not(tmp_path):
    """The learning test: DIVO's greedy action lands in the best-paying mode on most seeds,
    while plain TD3+BC (BC toward all four modes) does markedly worse on the same seeds."""
    from divo.agents.policy_io import load_policy
    from divo.data.bandit import best_action

    best = torch.as_tensor(best_action())
    seeds = (0, 1, 2)
    scores: dict[str, list[float]] = {"divo": [], "td3bc": []}
    hits, biases = [], []
    for recipe in scores:
        for seed in seeds:
            cfg = compose_recipe(
                recipe,
                [f"seed={seed}", "dataset=bandit", "train.steps=1500", "train.eval_every=1500",
                 "train.progress=false", "train.checkpoint_every=1500"],
            )  # fmt: skip
            result = train(cfg, tmp_path / f"{recipe}-{seed}")
            scores[recipe].append(result["normalized_score"])
            if recipe == "divo":
                pi, _ = load_policy(Path(result["run_dir"]))
                with torch.no_grad():
                    action = pi(torch.zeros(1, 1)).squeeze(0)
                hits.append(bool((action - best).norm() < 0.25))
                with (Path(result["run_dir"]) / "metrics.csv").open() as f:
                    final = [r for r in csv.DictReader(f) if r.get("eval_q_bias")][-1]
                # one step, no bootstrapping: the critic's value of the deployed action is the
                # reward it earns (rewards in [0, 1])
                biases.append(abs(float(final["eval_q_bias"])))
    assert sum(hits) >= 2, (hits, scores)
    assert max(biases) < 0.1, biases
    mean = {k: sum(v) / len(v) for k, v in scores.items()}
    assert mean["divo"] > 80 and mean["divo"] - mean["td3bc"] > 50, scores


def test_non_finite_loss_stops_the_run_naming_loss_and_step(tmp_path, monkeypatch):
    from divo.agents.agent import OfflineAgent

    calls = {"n": 0}
    real_update = OfflineAgent.update

    def update(self, batch, generator=None):
        calls["n"] += 1
        metrics = real_update(self, batch, generator)
        if calls["n"] >= 4:
            metrics["loss_critic"] = torch.tensor(float("nan"))
        return metrics

    monkeypatch.setattr(OfflineAgent, "update", update)
    cfg = compose_recipe(
        "td3bc", [o for o in FAST if o != "--quiet"] + ["dataset=bandit", "train.progress=false"]
    )
    with pytest.raises(DivoError, match="non-finite loss_critic at step 4"):
        train(cfg, tmp_path / "run")
    # the checkpoint of step 3 (before the NaN) is kept
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")] == [
        "step_000000003.pt"
    ]
    # before any checkpoint, the message names no folder that does not exist
    calls["n"] = 0
    cfg = compose_recipe(
        "td3bc",
        [o for o in FAST if o != "--quiet"]
        + ["dataset=bandit", "train.progress=false", "train.checkpoint_every=5"],
    )
    with pytest.raises(DivoError, match="at step 4.*no checkpoint was written yet") as exc:
        train(cfg, tmp_path / "early")
    assert "checkpoints" not in str(exc.value)


def test_optional_logger_backend_works_or_says_what_to_install(tmp_path):
    import importlib.util

    cfg = compose_recipe(
        "td3bc",
        [o for o in FAST if o != "--quiet"]
        + ["dataset=bandit", "train.progress=false", "logger.backend=tensorboard"],
    )
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match=re.escape(install_hint("tensorboard"))):
            train(cfg, tmp_path / "run")
    else:
        train(cfg, tmp_path / "run")
        assert any((tmp_path / "run" / "tensorboard").rglob("events.*"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_divo_trains_on_cuda_with_the_dataset_on_the_device(tmp_path):
    cfg = compose_recipe(
        "divo",
        [o for o in FAST if o != "--quiet"]
        + ["dataset=bandit", "train.progress=false", "device=cuda"],
    )
    result = train(cfg, tmp_path / "run")
    assert result["device"].startswith("cuda")
    data = load_offline_data(cfg.dataset.id, device="cuda")
    assert data.data.device.type == "cuda"
    assert data.replay_buffer(8).sample()["observation"].device.type == "cuda"


def test_the_python_api_writes_train_log_and_prints_evaluations(tmp_path, capsys):
    """`train(cfg, run_dir)` writes the same train.log as `divo train` and prints the lines."""
    cfg = compose_recipe("td3bc", [*cfg_overrides(), "dataset=bandit"])
    train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    log = (tmp_path / "run" / "train.log").read_text()
    for text in (
        "data divo/bandit/multimodal-v0",
        "step 3: normalized score",
        "step 6: normalized",
    ):
        assert text in log and text in out, text


def test_the_plan_device_and_eta_are_printed_and_long_cpu_runs_warned(
    tmp_path, capsys, monkeypatch
):
    from divo.agents.runs import Eta

    monkeypatch.setattr(Eta, "MEASURE_STEPS", 20)
    monkeypatch.setattr(Eta, "CPU_WARN_S", 0.0)  # any remaining time counts as "hours"
    cfg = compose_recipe(
        "td3bc",
        [*cfg_overrides(), "dataset=bandit", "device=cpu", "train.steps=60", "train.eval_every=60",
         "train.checkpoint_every=60", "critic.network.hidden=[16]", "actor.network.hidden=[16]"],
    )  # fmt: skip
    with pytest.warns(UserWarning, match="this CPU run of 60 steps needs about .* train.steps"):
        train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    assert "training 60 steps on cpu (" in out
    # the evaluation still to come (at step 60) is counted at the step-0 one's duration
    eta = r"\d+ steps/s: about \d+ s to go \(step 30 of 60, 1 evaluation\(s\) of about \d+ s"
    assert re.search(eta, out), out
    assert "this CPU run of 60 steps" in (tmp_path / "run" / "train.log").read_text()


def test_buffers_that_would_train_to_a_wrong_score_are_refused(hopper_dataset, tmp_path):
    """Each of these trained and reported a score: actions outside [-1, 1] with no dataset to
    rescale by (the policy could never reach them), an all-zero buffer (a loader that failed to
    fill it); an empty buffer was TorchRL's bare error, obs_stats with std 0 a non-finite
    loss at step 1. Nothing is written."""
    data = load_offline_data(hopper_dataset)
    content = data.data[:200].clone()
    no_id = compose_recipe("td3bc", [*cfg_overrides(), "dataset=minari", "dataset.id=null"])

    def buffer(td=None):
        rb = TensorDictReplayBuffer(storage=LazyTensorStorage(200), batch_size=32)
        if td is not None:
            rb.extend(td)
        return rb

    wide = content.clone()
    wide["action"] = wide["action"] * 4.0
    with pytest.raises(DatasetError, match=r"outside the \[-1, 1\] .*dataset.id is null"):
        train(no_id, tmp_path / "wide", replay_buffer=buffer(wide))
    with pytest.raises(DatasetError, match="every action in the replay buffer .* is the same"):
        train(no_id, tmp_path / "zeros", replay_buffer=buffer(content.clone().zero_()))
    with pytest.raises(DatasetError, match="the replay buffer is empty"):
        train(no_id, tmp_path / "empty", replay_buffer=buffer())
    ones = (torch.zeros(data.observation_dim), torch.ones(data.observation_dim))
    zero_std = (ones[0], ones[1].clone().index_fill_(0, torch.tensor([3]), 0.0))
    with pytest.raises(ConfigError, match="std > 0"):
        train(no_id, tmp_path / "std0", replay_buffer=buffer(content), obs_stats=zero_std)
    assert sorted(tmp_path.iterdir()) == []


def test_non_finite_values_in_a_user_buffer_are_refused_when_it_is_handed_over(
    hopper_dataset, tmp_path
):
    data = load_offline_data(hopper_dataset)
    content = data.data[:200].clone()
    content["next", "reward"][7] = float("nan")
    content["observation"][3, 2] = float("inf")
    cfg = compose_recipe(
        "td3bc", [*cfg_overrides(), "dataset=minari", f"dataset.id={hopper_dataset}"]
    )
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(200), batch_size=32)
    rb.extend(content)
    with pytest.raises(DatasetError, match="holds non-finite .*1 in observation, 1 in next/reward"):
        train(cfg, tmp_path / "run", replay_buffer=rb)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_user_buffer_is_sampled_at_train_batch_size(hopper_dataset, tmp_path):
    """A buffer built with another batch size than train.batch_size is refused (its batches
    silently replaced the recipe's while config.yaml recorded the recipe's, and a resume with
    another buffer changed the updates' batch unchecked); one built with none is sampled at
    train.batch_size."""
    data = load_offline_data(hopper_dataset)
    cfg = compose_recipe(
        "td3bc", [*cfg_overrides(), "dataset=minari", f"dataset.id={hopper_dataset}"]
    )
    other = TensorDictReplayBuffer(storage=LazyTensorStorage(200), batch_size=8)
    other.extend(data.data[:200].clone())
    with pytest.raises(ConfigError, match="batches of 8 but train.batch_size is 32"):
        train(cfg, tmp_path / "other", replay_buffer=other)
    assert not (tmp_path / "other").exists()
    sizes = []
    unsized = TensorDictReplayBuffer(storage=LazyTensorStorage(200))
    unsized.extend(data.data[:200].clone())
    sample = unsized.sample
    unsized.sample = lambda *a, **k: (
        sizes.append(k.get("batch_size", a[0] if a else None)) or (sample(*a, **k))
    )
    train(cfg, tmp_path / "unsized", replay_buffer=unsized)
    assert sizes and set(sizes) == {32}
