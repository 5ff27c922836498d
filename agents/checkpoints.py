"""Checkpoints and policy files of a run: what they hold, writing them, reading them back.

``<run>/checkpoints/step_*.pt`` hold everything an exact resume needs; ``<run>/policy.pt`` holds
only what ``divo evaluate`` needs. Both are plain data with the SHA-256 of their contents, checked
whenever they are read (:mod:`divo.files`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from divo.agents.agent import OfflineAgent
from divo.agents.formats import (
    CHECKPOINT_FORMAT,
    OLDER_CHECKPOINT_FORMATS,
    OLDER_POLICY_FORMATS,
    POLICY_FORMAT,
    accept_checkpoint,
)
from divo.agents.runtime import (
    numpy_rng_state,
    rng_state,
)
from divo.agents.trust import Trust, check_config, config_modules, trusted_modules
from divo.data.load import OfflineData
from divo.errors import CheckpointError, DivoError, UntrustedFileError, first_few
from divo.files import atomic_save, damaged_file_error, read_file


def spec_json(data: OfflineData | None) -> str | None:
    spec = data.eval_env_spec if data is not None else None
    if spec is None:
        return None
    try:
        return spec.to_json()
    except Exception as exc:  # noqa: BLE001 - e.g. a callable in the env kwargs
        warnings.warn(
            f"the environment spec of {data.dataset_id} cannot be saved as JSON ({exc}); "
            "`divo evaluate` will not be able to rebuild it",
            stacklevel=2,
        )
        return None


def policy_payload(agent: OfflineAgent, cfg: DictConfig, data: OfflineData | None, step: int):
    """What ``divo evaluate`` needs to rebuild and run the policy, and nothing of training."""
    return {
        "format": POLICY_FORMAT,
        "recipe": cfg.get("recipe"),
        "step": step,
        "policy_config": agent.policy_config,
        "state_dict": {
            # tensors to the CPU; a module's extra state (e.g. the consistency model's
            # curriculum position) is kept as it is
            k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
            for k, v in agent.policy.state_dict().items()
        },
        "dataset_id": data.dataset_id if data is not None else None,
        "env_spec": spec_json(data),
        "ref_min_score": data.ref_min_score if data is not None else None,
        "ref_max_score": data.ref_max_score if data is not None else None,
        # what the normalised score measures: "return" (D4RL's) or "success" (OGBench's)
        "score": data.score if data is not None else "return",
    }


def save_policy_file(payload: dict[str, Any], path: Path) -> Path:
    """Write a policy payload (:func:`policy_payload`), e.g. a run's ``policy.pt``: plain data
    with the checksum of its contents, atomically."""
    return atomic_save(payload, path, checksum=True)


class Checkpointer:
    """``<run>/checkpoints/step_*.pt``: atomic writes, the newest ``keep`` kept."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.dir = run_dir / "checkpoints"
        self.keep = max(1, keep)
        self.damaged: set[Path] = set()  # files load_latest found damaged (until rewritten)

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("step_*.pt"))

    def last_good(self) -> str:
        """Where the last good state is, for an error message: a file that exists and was not
        found damaged, or none."""
        files = [f for f in self.files() if f not in self.damaged]
        return f"last good checkpoint: {files[-1]}" if files else "no checkpoint was written yet"

    def save(self, step: int, agent: OfflineAgent, cfg, data, extra: dict[str, Any]) -> Path:
        bad = agent.non_finite_parameters()
        if bad:  # never overwrite good checkpoints with a diverged model
            raise DivoError(
                f"non-finite parameters ({', '.join(bad[:3])}) at step {step}; lower the learning "
                f"rates or check the data ({self.last_good()})"
            )
        payload = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "agent": agent.training_state(),
            "rng": rng_state(),
            "policy": policy_payload(agent, cfg, data, step),
            **extra,
        }
        path = atomic_save(payload, self.dir / f"step_{step:09d}.pt", checksum=True)
        self.damaged.discard(path)
        for old in self.files()[: -self.keep]:
            old.unlink()
        # a write a killed process left half-done (SIGKILL skips atomic_save's clean-up): the
        # run is held by this process, so no other writer owns one
        for stale in self.dir.glob(".step_*.pt.*.tmp"):
            stale.unlink(missing_ok=True)
        return path

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint and its path; a damaged one (unreadable, or not
        matching its checksum) is skipped with a warning, one that holds a pickled object is
        refused (:func:`load_checkpoint`)."""
        files = self.files()
        for path in reversed(files):
            try:
                return path, load_checkpoint(path)
            except UntrustedFileError:
                raise
            except CheckpointError as exc:
                self.damaged.add(path)
                warnings.warn(f"{exc}; falling back to the previous checkpoint", stacklevel=2)
        if files:
            raise CheckpointError(
                f"no readable checkpoint in {self.dir}; delete the folder to start again"
            )
        return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file of this format (its checksum checked) or of an older plain-data one,
    read as plain data (:func:`divo.files.read_file`)."""
    payload, checked = read_file(path)
    return accept_checkpoint(payload, checked, path)


def check_trusted(
    ckpt: dict, file: Path, cfg: DictConfig, data_spec: str | None, trust: Trust
) -> None:
    """Refuse a checkpoint whose configs name classes, or whose environment spec names entry
    points, that loading its run's files could not run: outside divo, gymnasium and the
    modules trusted here (``trust``, and those ``cfg`` names: its caller chose them)."""
    from divo.agents.policy_io import check_policy_payload

    modules = (*trusted_modules(trust), *config_modules(OmegaConf.to_container(cfg)))
    check_config(ckpt.get("config"), modules, str(file))
    policy = dict(ckpt.get("policy") or {})
    if policy.get("env_spec") == data_spec:  # the environment this run evaluates in anyway
        policy.pop("env_spec", None)
    check_policy_payload(policy, modules, file)


# the settings a run may change when it resumes (extend train.steps, another device, ...)
RESUMABLE_KEYS = ("train", "device", "logger")
# ... except these of train.*: they change the updates, or the runs a folder holds
TRAINING_KEYS_OF_TRAIN = ("batch_size", "num_seeds")


def what_trains(config: dict) -> dict:
    """A config without the keys a resume may change: two runs with equal ``what_trains``
    train the same model."""
    kept = {k: v for k, v in config.items() if k not in RESUMABLE_KEYS}
    train = config.get("train")
    if isinstance(train, dict):
        kept["train"] = {k: train[k] for k in TRAINING_KEYS_OF_TRAIN if k in train}
    return kept


def config_differences(old: Any, new: Any, prefix: str = "", both: bool = False) -> list[str]:
    """``key: old -> new`` for each setting that differs between two config containers;
    ``both``: only keys both hold (an option added since one was written is not a change)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) & set(new) if both else set(old) | set(new)
        return [
            d
            for k in sorted(keys, key=str)
            for d in config_differences(old.get(k), new.get(k), f"{prefix}{k}.", both)
        ]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_resumable(
    ckpt: dict,
    cfg: DictConfig,
    obs_dim: int,
    act_dim: int,
    where: Path,
    fingerprint: str | None = None,
):
    """Refuse a checkpoint that another recipe or other data wrote (before touching files):
    other sizes, or, where both the checkpoint and this call know it, another fingerprint of
    the transitions (:func:`divo.data.load.data_fingerprint`: the file was regenerated,
    edited or replaced since the run started)."""
    saved = ckpt["config"]
    if saved.get("recipe") != cfg.get("recipe"):
        raise CheckpointError(
            f"{where} holds a checkpoint of recipe {saved.get('recipe')!r}, not "
            f"{cfg.get('recipe')!r}; {_resume_hint(saved, where)}"
        )
    dims = (ckpt.get("observation_dim"), ckpt.get("action_dim"))
    if dims != (obs_dim, act_dim):
        raise CheckpointError(
            f"{where} holds a checkpoint for observation/action sizes {dims[0]}/{dims[1]} but "
            f"the data have {obs_dim}/{act_dim}; resume with the dataset it was trained on "
            f"({saved.get('dataset', {}).get('id')}) or use a new run directory"
        )
    before = ckpt.get("data_fingerprint")
    if before and fingerprint and before != fingerprint:
        if fingerprint.startswith("sha256-buffer:") or before.startswith("sha256-buffer:"):
            source = "the replay buffer given"
        else:
            source = f"dataset {saved.get('dataset', {}).get('id')!r}"
        raise CheckpointError(
            f"{where} was trained on other data than {source} holds now (fingerprint "
            f"{before[:26]}... in its checkpoint, {fingerprint[:26]}... now): the data were "
            "regenerated, edited or replaced since the run started, and resuming would train "
            "one run on two datasets. Restore the data it started on, or start again in a new "
            "run directory (the run was left as it is)"
        )
    changed = config_differences(
        what_trains(saved), what_trains(OmegaConf.to_container(cfg, resolve=True)), both=True
    )
    if changed:
        shown = first_few(changed)
        raise CheckpointError(
            f"{where} holds a checkpoint trained with other settings than its config.yaml "
            f"now says ({shown}): the file was edited or replaced since. Resuming would go on "
            "under settings the run did not start with: restore the config.yaml it started "
            "with (the settings above as the checkpoint holds them), or start a new run "
            "directory (the run was left as it is)"
        )


def _resume_hint(saved: dict, where: Path) -> str:
    """How to go on with a run whose checkpoint this call refused: ``divo train <run>`` only
    when the run's own config.yaml names the checkpoint's recipe (else that command is the one
    refused)."""
    try:
        own = OmegaConf.load(where / "config.yaml").get("recipe")
    except Exception:  # noqa: BLE001 - missing or unreadable: the command would fail too
        own = None
    if own == saved.get("recipe"):
        return f"resume it with `divo train {where}` or use a new run directory"
    return (
        f"its config.yaml no longer matches its checkpoints (recipe {own!r}): use a new run "
        "directory, or delete the checkpoints to start this one again"
    )


def convert_file(path: str | Path) -> str:
    """Rewrite a policy file or checkpoint of an older divo as plain data with a checksum, in
    this version's format (in place, atomically); returns what was done, for one line of output.

    Reads the file as plain data plus the NumPy array an older divo pickled
    (:data:`divo.files.LEGACY_GLOBALS`), and nothing else: a file whose pickle names anything
    more is refused without running it (:class:`UntrustedFileError`) and left as it is, and so
    is a file that does not match its checksum. A file of this version is left as it is.
    """
    path = Path(path)
    payload, checked = read_file(path, legacy=True)
    found = payload.get("format") if isinstance(payload, dict) else None
    if found in (POLICY_FORMAT, CHECKPOINT_FORMAT):
        if not checked:
            raise damaged_file_error(
                path, f"a {found} file carries the checksum of its contents, and it has none"
            )
        return f"{path}: already plain data with a checksum ({found}), left as it is"
    if found == "divo-checkpoint-v1":  # v1 kept NumPy's RNG state as a pickled ndarray
        rng = dict(payload["rng"])
        rng["numpy"] = numpy_rng_state(rng["numpy"])
        converted = {**payload, "format": CHECKPOINT_FORMAT, "rng": rng}
    elif found in OLDER_CHECKPOINT_FORMATS:
        converted = {**payload, "format": CHECKPOINT_FORMAT}
    elif found in OLDER_POLICY_FORMATS:
        converted = {**payload, "format": POLICY_FORMAT}
    else:
        raise CheckpointError(
            f"{path} is not a divo policy file or checkpoint (format {found!r}); nothing converted"
        )
    policy = converted.get("policy")
    if found != converted["format"] and isinstance(policy, dict):  # a checkpoint's policy
        converted["policy"] = {**policy, "format": POLICY_FORMAT}
    atomic_save(converted, path, checksum=True)  # refuses (and keeps the file) if objects remain
    return f"{path}: {found} -> {converted['format']}, plain data with a checksum"


def run_files(path: str | Path) -> list[Path]:
    """A file -> itself; a folder -> every policy.pt and checkpoints/step_*.pt under it."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted(path.glob("**/policy.pt")) + sorted(path.glob("**/checkpoints/step_*.pt"))
