"""Command-line basics: help and version, install hints that fit the installation, "did you
mean" for misspelt keys, the download extra, and the distribution name."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

import divo.errors
from divo.cli import main
from divo.errors import DISTRIBUTION, DatasetError, install_hint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args, text",
    [
        (["--help"], "usage: divo <command>"),
        (["train", "--help"], "usage: divo train <recipe"),
        (["train", "-h"], "divo train <run dir>"),
        (["train", "td3bc", "--help"], "Configuration groups of td3bc"),
        (["evaluate", "--help"], "usage: divo evaluate"),
        (["report", "--help"], "usage: divo report"),
        (["study", "--help"], "usage: divo study"),
        (["data", "--help"], "usage: divo data"),
        (["data", "build", "--help"], "usage: divo data build"),
    ],
)
def test_help_prints_and_exits_0(args, text, capsys):
    assert main(args) == 0
    assert text in capsys.readouterr().out


def test_help_on_a_run_directory(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--help"]) == 0
    assert "divo train <run dir>" in capsys.readouterr().out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert re.match(r"divo \d+\.\d+\.\d+ \(distribution divo-rl", capsys.readouterr().out)


class _Dist:
    def __init__(self, direct_url: dict | None) -> None:
        self.direct = json.dumps(direct_url) if direct_url else None

    def read_text(self, name: str) -> str | None:
        return self.direct if name == "direct_url.json" else None


@pytest.mark.parametrize(
    "direct_url, source_tree, expected",
    [
        ({"url": "file:///home/me/divo", "dir_info": {"editable": True}}, False,
         'pip install -e "/home/me/divo[wandb]"'),
        ({"url": "file:///home/me/divo", "dir_info": {}}, False,
         'pip install "/home/me/divo[wandb]"'),
        (None, False, 'pip install "divo-rl[wandb]"'),  # from the package index
        (None, True, f'pip install -e "{ROOT}[wandb]"'),  # a checkout on sys.path, not installed
    ],
)  # fmt: skip
def test_install_hints_fit_how_divo_was_installed(direct_url, source_tree, expected, monkeypatch):
    from importlib import metadata

    monkeypatch.setattr(metadata, "distributions", lambda name: iter([_Dist(direct_url)]))
    if not source_tree:  # as installed in site-packages: no pyproject.toml next to the package
        monkeypatch.setattr(divo.errors, "__file__", "/venv/site-packages/divo/errors.py")
    assert install_hint("wandb") == expected


def test_this_checkout_gets_the_editable_hint():
    assert install_hint("report") == f'pip install -e "{ROOT}[report]"'


def _error(args, capsys) -> str:
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("divo: error: "), err
    return err[0]


def test_a_misspelt_key_gets_did_you_mean_not_hydras_append_hint(tmp_path, capsys):
    line = _error(["train", "td3bc", "dataset=bandit", "train.stepz=3"], capsys)
    assert "did you mean train.steps?" in line and "train.stepz=3" in line
    assert "+train.stepz" not in line and "append" not in line
    line = _error(["train", "divo", "behavior_modle=cvae"], capsys)
    assert "did you mean behavior_model?" in line
    # a key far from every key of the recipe: how to list the keys, or add a new one
    line = _error(["train", "td3bc", "train.zzzzzz=1"], capsys)
    assert "--cfg job" in line and "+train.zzzzzz" not in line  # divo would never read it
    line = _error(["train", "td3bc", "actor.network.zzzzzz=1"], capsys)
    assert "--cfg job" in line and "+actor.network.zzzzzz=1" in line  # a constructor argument
    # ... but not under a section that is no component (divo would never read the key there)
    line = _error(["train", "td3bc", "actor.zzzzzz=1"], capsys)
    assert "--cfg job" in line and "+actor.zzzzzz" not in line
    line = _error(["train", "td3bc", "+critic.hidden=[256]"], capsys)
    assert "no setting critic.hidden" in line and "did you mean critic.network.hidden" in line
    # a new key where divo reads its settings by name is refused (Hydra would take it, and the
    # run would start with the setting it meant to change at its default)
    line = _error(["train", "td3bc", "+train.step=100"], capsys)
    assert "no setting train.step" in line and "did you mean train.steps?" in line
    line = _error(["train", "divo", "behavior_model=cvea"], capsys)
    assert "did you mean cvae?" in line and "consistency, custom, cvae, ddpm" in line
    # the same on a resume
    run = tmp_path / "run"
    fast = ["dataset=bandit", "train.steps=2", "train.eval_episodes=0", "train.batch_size=8"]
    assert main(["train", "td3bc", "--quiet", *fast, f"hydra.run.dir={run}"]) == 0
    capsys.readouterr()
    line = _error(["train", str(run), "train.stepz=4"], capsys)
    assert "did you mean train.steps?" in line


def test_unknown_command_suggests_the_closest(capsys):
    assert "did you mean train?" in _error(["trian"], capsys)


def test_remote_datasets_name_the_download_extra(monkeypatch):
    import minari

    from divo.data.load import load_offline_data

    def no_hf(*args, **kwargs):
        raise ImportError('huggingface_hub is not installed. Please install "minari[hf]"')

    monkeypatch.setattr(minari, "load_dataset", no_hf)
    with pytest.raises(DatasetError, match=re.escape(install_hint("download"))):
        load_offline_data("mujoco/hopper/medium-v0", download=True)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(req.startswith("minari[hf]") for req in extras["download"])


def test_the_distribution_is_divo_rl_everywhere():
    """`divo` on the package index is another project: the distribution, its self-references
    in extras, and every install hint name divo-rl; the README warns about the other one."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION == "divo-rl"
    self_refs = [r for reqs in project["optional-dependencies"].values() for r in reqs
                 if re.match(r"divo\b", r)]  # fmt: skip
    assert self_refs and all(r.startswith("divo-rl[") for r in self_refs)
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("recipes/**/*.yaml")]
    files += [
        p
        for d in ("divo", "agents", "objectives", "behavior_models")
        for p in (ROOT / d).rglob("*.py")
    ]
    pattern = re.compile(r"pip install[^\n`]*\bdivo\[")
    wrong = [f"{p.name}: {m}" for p in files for m in pattern.findall(p.read_text())]
    assert not wrong
    readme = (ROOT / "README.md").read_text()
    assert "pip install divo-rl" in readme or "divo-rl[" in readme
    assert re.search(r"other `divo`[^.]*must not be installed", readme)
