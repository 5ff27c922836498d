"""The package's layout: no import circle anywhere, the data package below the rest, the front
door, and old import paths that still work."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import divo

ROOT = Path(__file__).resolve().parents[1]
# where each sub-package's files live (the design card's top-level folders install into divo)
PACKAGE_DIRS = {
    "divo": ROOT / "divo",
    "divo.agents": ROOT / "agents",
    "divo.behavior_models": ROOT / "behavior_models",
    "divo.objectives": ROOT / "objectives",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "divo" and parts and parts[0] in ("agents",):
                continue
            found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The divo modules ``name`` imports anywhere in its file (function-level imports count:
    a circle through a lazy import is still a circle). ``divo`` itself (the front door) counts
    only where a module imports a name from it."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and (target != "divo" or isinstance(node, ast.ImportFrom)):
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_walker_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_the_graph_sees_the_packages():
    graph = _graph()
    assert "divo.data.load" in graph and "divo.agents.train" in graph
    assert "divo.data.builtin" in graph["divo.data.load"]
    assert "divo.agents.vectorized" in graph["divo.agents.train"]


def test_no_import_circle_in_the_package():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "forbidden", ["divo.agents", "divo.studies", "divo.cli", "divo.report", "divo.api"]
)
def test_the_data_package_imports_nothing_above_it(forbidden):
    graph = _graph()
    offenders = {
        module: sorted(t for t in targets if t == forbidden or t.startswith(forbidden + "."))
        for module, targets in graph.items()
        if module.startswith("divo.data")
    }
    offenders = {m: t for m, t in offenders.items() if t}
    assert not offenders, f"the data package imports from {forbidden}: {offenders}"


def test_the_library_does_not_import_the_studies_or_the_cli():
    graph = _graph()
    library = [
        m
        for m in graph
        if not m.startswith(("divo.studies", "divo.cli", "divo.api", "divo._moved")) and m != "divo"
    ]
    for module in library:
        bad = [t for t in graph[module] if t.startswith(("divo.studies", "divo.cli"))]
        assert not bad, f"{module} imports {bad}"


def test_front_door_is_lazy_and_complete():
    code = (
        "import sys, divo; heavy = [m for m in ('torch', 'divo.agents.train', 'hydra') "
        "if m in sys.modules]; print(heavy); "
        "print([callable(getattr(divo, n)) for n in "
        "('compose', 'train', 'load_policy', 'load_offline_data', 'evaluate')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines == ["[]", "[True, True, True, True, True]"]
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        divo.trian  # noqa: B018


def test_front_door_train_takes_a_recipe_name(tmp_path):
    result = divo.train(
        "td3bc",
        tmp_path / "run",
        overrides=["dataset=bandit", "train.steps=4", "train.eval_every=4", "train.log_every=2"],
    )
    assert result["steps"] == 4 and (tmp_path / "run" / "policy.pt").is_file()
    cfg = divo.compose("td3bc", ["dataset=bandit"])
    with pytest.raises(divo.ConfigError, match="compose it with them"):
        divo.train(cfg, tmp_path / "other", overrides=["seed=1"])


def test_old_import_paths_still_work_with_one_line_notice():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from divo.agents.data import load_offline_data
        from divo.datasets import BANDIT_DATASET_ID, write_minari_dataset
        from divo.envs.bandit import MultimodalBanditEnv
        from divo.factory.build import build_datasets

    from divo.data.bandit import BANDIT_DATASET_ID as new_id
    from divo.data.bandit import MultimodalBanditEnv as new_env
    from divo.data.factory.build import build_datasets as new_build
    from divo.data.load import load_offline_data as new_load
    from divo.data.minari_io import write_minari_dataset as new_write

    assert (load_offline_data, BANDIT_DATASET_ID, write_minari_dataset) == (
        new_load,
        new_id,
        new_write,
    )
    assert MultimodalBanditEnv is new_env and build_datasets is new_build
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert any("divo.envs.bandit moved to divo.data.bandit" in m for m in messages)
    assert all("\n" not in m for m in messages)


def test_a_policy_file_naming_the_old_bandit_entry_point_still_evaluates():
    from gymnasium.envs.registration import EnvSpec

    from divo.data.envs import make_env

    spec = EnvSpec(
        id="divo/MultimodalBandit-v0", entry_point="divo.envs.bandit:MultimodalBanditEnv"
    )
    env = make_env(EnvSpec.from_json(spec.to_json()))
    assert type(env.unwrapped).__module__ == "divo.data.bandit"
    env.close()
