"""The documentation: a README a new user can read, and docs whose links and keys are real.

- README.md is at most 350 lines and walks a new user in a fixed order (what it is, install,
  first steps on a cluster with the site config first, what survives what, tests, links);
- every relative link in README.md and docs/*.md points to a file or folder that exists, and a
  link to a heading (``file.md#heading``) to a heading that exists there;
- every config key the docs name (``train.epochs``, ``hydra.launcher.timeout_min``, ...) is a
  field of the typed schema or of the launcher's or sweeper's options: a renamed or removed key
  must not live on in the docs.

Reads text and imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

from mnist_hpc import rundir

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_MAX_LINES = 350
DOCS = sorted((REPO / "docs").glob("*.md"))
# Files that the docs link to and that another branch of issue 22 adds: each entry is allowed to
# be missing while it is listed here, and must be removed from here once the file exists.
PENDING = {
}

# [text](target), not inside a fenced code block (those are removed first).
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", flags=re.M)


def markdown_files() -> list[Path]:
    return [README, *DOCS]


def prose(path: Path) -> str:
    """The file's text without its fenced code blocks (a link in a code sample is not a link)."""
    return FENCE.sub("", path.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in ``path``; a repeated heading gets GitHub's -1, -2, ... suffix."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, title in HEADING.findall(prose(path)):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path)) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def broken_links(path: Path) -> list[str]:
    """The links in ``path`` whose file, folder or heading does not exist (pending files aside)."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        name = dest.relative_to(REPO).as_posix() if dest.is_relative_to(REPO) else str(dest)
        if not dest.exists():
            if name not in PENDING:
                broken.append(f"{target} (no {name})")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {name})")
    return broken


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_walks_a_new_user_in_order():
    """What it is, install, first steps (site config first), what survives what, tests, links."""
    text = prose(README)
    sections = [title for level, title in HEADING.findall(text) if level == "##"]
    assert sections == ["Install", "First steps on a cluster", "What survives what", "Tests", "Documentation"]
    first_steps = text.split("## First steps on a cluster", 1)[1].split("\n## ", 1)[0]
    steps = [title.lower() for level, title in HEADING.findall(first_steps) if level == "###"]
    order = ["account and partition", "data", "prefetch", "submit", "status", "report", "search"]
    assert len(steps) == len(order) and all(word in step for word, step in zip(order, steps)), steps
    # What it is comes first, before any section.
    assert text.index("Slurm") < text.index("## Install")


def test_every_doc_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    docs = {p.resolve() for p in DOCS} | {(REPO / name).resolve() for name in PENDING if name.startswith("docs/")}
    assert docs - linked == set(), "docs/ pages the README does not link to"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_point_to_files_and_headings_that_exist(path: Path):
    assert broken_links(path) == []


def test_pending_files_are_still_missing():
    """An entry of PENDING whose file now exists has served its purpose: remove it."""
    assert [name for name in PENDING if (REPO / name).exists()] == []


def test_the_link_checker_finds_broken_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## The login/compute contract\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#the-logincompute-contract) [ok](#top) [web](https://example.org/x)\n"
        "[gone](docs/b.md) [no heading](docs/a.md#nowhere)\n"
        "```\n[in code](docs/c.md)\n```\n# Top\n"
    )
    assert broken_links(page) == ["docs/b.md (no docs/b.md)", "docs/a.md#nowhere (no heading #nowhere in docs/a.md)"]


# ------------------------------------------------------------------------------ config keys


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def known_keys() -> dict[str, set[str]]:
    """The keys each prefix the docs use may name: the schema's groups, and every launcher's and
    sweeper's options as our Hydra plugins register them in ConfigStore (whichever plugins exist)."""
    import importlib
    import pkgutil

    from hydra.core.config_store import ConfigStore

    import hydra_plugins.mnist_hpc_launcher as plugins
    from mnist_hpc import config

    for module in pkgutil.iter_modules(plugins.__path__):
        importlib.import_module(f"{plugins.__name__}.{module.name}")  # each registers its options
    keys = {f.name: field_names(f.type if isinstance(f.type, type) else getattr(config, f.type))
            for f in dataclasses.fields(config.Config)}
    store = ConfigStore.instance()
    for group in ("hydra/launcher", "hydra/sweeper"):
        names = store.list(group)
        assert names, f"no {group} options registered"
        keys[group.replace("/", ".")] = {k for name in names for k in store.load(f"{group}/{name}").node}
    return keys


# A key as the docs write it, in backticks or after a space: `train.epochs`, train.epochs=3.
KEY = re.compile(r"(?<![\w./-])(hydra\.launcher|hydra\.sweeper|data|model|optimizer|train|paths)\.([a-z_]+)\b")
# Names of that shape that are files or methods, not keys: run files, sbatch templates, modules.
NOT_KEYS = {rundir.LOG_FILE, rundir.MODEL_FILE, "train.sbatch", "train.py", "model.py", "data.py", "model.fit"}


def named_keys(text: str) -> set[str]:
    return {f"{prefix}.{name}" for prefix, name in KEY.findall(text)} - NOT_KEYS


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_config_key_named_in_the_docs_exists(path: Path):
    keys = known_keys()
    unknown = sorted(k for k in named_keys(path.read_text()) if k.rpartition(".")[2] not in keys[k.rpartition(".")[0]])
    assert unknown == [], f"{path.name} names keys the config does not have"


def test_the_key_finder_sees_keys_and_skips_files():
    text = f"`train.epochs=3` hydra.launcher.timeout_min=5 slurm/train.sbatch `{rundir.MODEL_FILE}` x.train.y"
    assert named_keys(text) == {"train.epochs", "hydra.launcher.timeout_min"}
