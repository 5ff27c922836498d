"""The README and the documentation site (docs/, mkdocs.yml) stay in step: every link of the
README resolves, every README section the site includes is marked, and every page is in the
site's navigation. CI builds the site itself with `mkdocs build --strict` (.ci/run)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's (and MkDocs' toc) anchor of a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(path: Path) -> set[str]:
    lines = path.read_text().splitlines()
    return {_slug(line.lstrip("#")) for line in lines if re.match(r"#{1,6} ", line)}


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file (or #anchor in a Markdown file) does not exist."""
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            bad.append(target)
    return bad


def test_every_readme_link_resolves():
    readme = ROOT / "README.md"
    assert len(LINK.findall(readme.read_text())) > 10
    assert broken_links(readme) == []


def test_the_link_check_finds_broken_links(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading) [web](https://example.org/x) "
        "[gone](missing.md) [no anchor](there.md#nope) ![img](fig.png)\n"
    )
    assert broken_links(page) == ["missing.md", "there.md#nope", "fig.png"]


def test_readme_sections_the_site_includes_are_marked():
    readme = (ROOT / "README.md").read_text()
    used = {
        name
        for page in (ROOT / "docs").rglob("*.md")
        for name in re.findall(r'--8<-- "README\.md:([\w-]+)"', page.read_text())
    }
    assert {"intro", "commands", "recipes"} <= used
    for name in used:
        start, end = f"<!-- --8<-- [start:{name}] -->", f"<!-- --8<-- [end:{name}] -->"
        assert readme.count(start) == 1 and readme.count(end) == 1, name
        assert readme.index(start) < readme.index(end), name


def test_every_docs_page_is_in_the_navigation():
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):  # mkdocs.yml may hold !!python/name tags: ignore them
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)

    def pages(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, dict):
            return [p for value in node.values() for p in pages(value)]
        return [p for item in node for p in pages(item)]

    nav = pages(config["nav"])
    docs = ROOT / config.get("docs_dir", "docs")
    assert all((docs / page).is_file() for page in nav), nav
    excluded = (config.get("exclude_docs") or "").split()
    on_disk = {
        rel
        for rel in (str(p.relative_to(docs)) for p in docs.rglob("*.md"))
        if not any(
            fnmatch.fnmatch(rel, pat.rstrip("/") + ("/*" if pat.endswith("/") else ""))
            for pat in excluded
        )
    }
    assert on_disk - set(nav) == set()


def _shape(line: str) -> str:
    """A log line as a pattern: every number may differ, the words may not."""
    parts = re.split(r"[-+]?\d+(?:\.\d+)?", line)
    return r"[-+]?\d+(?:\.\d+)?".join(re.escape(p) for p in parts)


def test_the_readme_quick_start_log_has_the_shape_of_the_real_log(tmp_path):
    """Every `data ...` and `step N: ...` line of the README's quick-start log has a line of
    the same words in the train.log of a short run (numbers aside)."""
    from divo.agents.train import train
    from divo.config import compose_recipe

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```\n(data divo/hopper.*?)```", readme, re.S)
    assert block, "the README's quick-start log block is missing"
    shown = [ln for ln in block.group(1).splitlines() if re.match(r"(data |step \d+:)", ln)]
    assert len(shown) >= 4
    cfg = compose_recipe(
        "divo",
        ["train.steps=4", "train.eval_every=2", "train.eval_episodes=1", "train.batch_size=32",
         "train.progress=false", "train.checkpoint_every=4"],
    )  # fmt: skip
    train(cfg, tmp_path / "run")
    logged = [re.sub(r"^\[[^]]*\]\[[^]]*\]\[\w+\] - ", "", ln)
              for ln in (tmp_path / "run" / "train.log").read_text().splitlines()]  # fmt: skip
    missing = [ln for ln in shown if not any(re.fullmatch(_shape(ln), got) for got in logged)]
    assert missing == [], (missing, logged)


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.slow
def test_the_python_api_page_runs_as_written(tmp_path, monkeypatch):
    """Every Python snippet of docs/python_api.md runs, in order, in one namespace, as a user
    would paste them; only the step budget is made tiny (and evaluation short)."""
    blocks = _python_blocks(ROOT / "docs" / "python_api.md")
    assert len(blocks) >= 3
    tiny = "train.steps=4', 'train.eval_every=4', 'train.log_every=2', 'train.eval_episodes=1"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        code = re.sub(r"train\.steps=\d+", tiny.replace("'", '"'), block)
        code = code.replace("episodes=5)", "episodes=1)")
        exec(compile(code, "docs/python_api.md", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "runs" / "my-run" / "policy.pt").is_file()
    assert (tmp_path / "runs" / "custom-buffer" / "result.json").is_file()
