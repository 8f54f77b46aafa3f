"""Installation: one TensorFlow distribution per documented install, and the README's two
commands on a Python that refuses `pip install` outside a venv (PEP 668).

tensorflow-cpu and tensorflow both install the tensorflow/ package directory; an environment
holding both breaks as soon as either is uninstalled. Each documented install must therefore
resolve to exactly one of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import IN_CI, REPO, SHARED_MNIST

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib  # type: ignore[no-redef]

SYSTEM_PYTHON = Path("/usr/bin/python3")
# Every distribution that installs the tensorflow/ package directory.
TENSORFLOW_DISTS = {"tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel", "tensorflow-macos"}
# Where the install commands are documented: the README's Quickstart section (with its
# "Installing on a cluster" subsection) and the two scripts it runs.
INSTALL_DOCS = ("README.md", "scripts/quickstart.sh", "scripts/test.sh")
# `pip install -e ".[cpu]"`, `pip install --quiet -e ".[cpu,test]"`, and the bare `pip install -e .`
PIP_EDITABLE = re.compile(r'pip install [^\n`]*?-e "?\.(?:\[([a-z0-9,-]+)\])?"?(?=[\s`]|$)', flags=re.M)


def is_tensorflow(name: str) -> bool:
    name = canonicalize_name(name)
    return name in TENSORFLOW_DISTS or name.startswith("tf-nightly")


def doc_text(doc: str) -> str:
    path, _, section = doc.partition("#")
    text = (REPO / path).read_text()
    if not section:
        return text
    match = re.search(rf"^## {section}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, f"{path} has no '## {section}' section"
    return match.group(1)


def documented_installs() -> dict[str, set[str]]:
    """Extras sets of every `pip install -e ".[...]"` in the install docs, keyed by "cpu,test" etc."""
    installs: dict[str, set[str]] = {}
    for doc in INSTALL_DOCS:
        for extras in PIP_EDITABLE.findall(doc_text(doc)):
            names = {e for e in extras.split(",") if e}
            installs[",".join(sorted(names)) or "base"] = names
    return installs


DOCUMENTED = documented_installs()


def test_docs_name_the_cpu_gpu_and_test_installs():
    # The README's commands pick CPU TensorFlow; GPU nodes have their own documented command.
    assert {"cpu", "cuda", "cpu,test"} <= set(DOCUMENTED), DOCUMENTED
    assert "base" not in DOCUMENTED, "a bare `pip install -e .` installs no TensorFlow: jobs could not train"
    assert not any({"cpu", "cuda"} <= extras for extras in DOCUMENTED.values()), DOCUMENTED


PLATFORMS = {
    "linux-x86_64": {"sys_platform": "linux", "platform_machine": "x86_64"},
    "linux-aarch64": {"sys_platform": "linux", "platform_machine": "aarch64"},
    "macos-arm64": {"sys_platform": "darwin", "platform_machine": "arm64"},
    "windows-amd64": {"sys_platform": "win32", "platform_machine": "AMD64"},
}


def declared_tensorflow(extras: set[str], platform: dict[str, str]) -> list[str]:
    """TensorFlow requirements that pyproject.toml declares for ``extras`` on ``platform``."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    found = []
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**platform, "extra": ""}):
            if is_tensorflow(req.name):
                found.append(canonicalize_name(req.name))
    return found


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_each_documented_install_declares_one_tensorflow_on_every_platform(platform: str):
    env = PLATFORMS[platform]
    assert declared_tensorflow(set(), env) == [], "TensorFlow must come from an extra, never the base"
    for key, extras in DOCUMENTED.items():
        found = declared_tensorflow(extras, env)
        assert len(found) == 1, f".[{key}] on {platform} declares {found}"
    # tensorflow-cpu exists for x86-64 Linux only; elsewhere `cpu` falls back to `tensorflow`.
    expected_cpu = "tensorflow-cpu" if platform == "linux-x86_64" else "tensorflow"
    assert declared_tensorflow({"cpu"}, env) == [expected_cpu]
    assert declared_tensorflow({"cuda"}, env) == ["tensorflow"]


def resolve(extras: set[str]) -> list[str]:
    """Distributions pip would install for ``<checkout>[extras]`` into an empty environment.

    ``--dry-run --report`` resolves with pip as configured here (its indexes and constraints)
    and installs nothing; ``--ignore-installed`` makes it list what is already installed too.
    """
    spec = f"{REPO}[{','.join(sorted(extras))}]" if extras else str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-", spec],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [canonicalize_name(item["metadata"]["name"]) for item in json.loads(proc.stdout)["install"]]


@pytest.mark.parametrize(
    "key",
    # Resolving the CUDA extra reads the metadata of a dozen NVIDIA wheels: about 40 s here.
    [pytest.param(k, marks=pytest.mark.slow) if "cuda" in k else k for k in sorted(DOCUMENTED)],
)
@pytest.mark.slow
def test_each_documented_install_resolves_to_one_tensorflow(key: str):
    names = resolve(DOCUMENTED[key])
    assert "mnist-hpc" in names
    found = [n for n in names if is_tensorflow(n)]
    assert len(found) == 1, f".[{key}] resolves to {found}"
    on_x86_linux = sys.platform == "linux" and os.uname().machine == "x86_64"
    if "cuda" in DOCUMENTED[key]:
        assert found == ["tensorflow"]
        assert any(n.startswith("nvidia-cudnn") for n in names), "the cuda extra must bring cuDNN"
    elif on_x86_linux:
        assert found == ["tensorflow-cpu"]
        assert not any(n.startswith("nvidia-") for n in names)


# ---------------------------------------------------------------- choosing the Python (scripts)


def clean_env(python3: Path, **extra: str) -> dict[str, str]:
    """The environment of a shell with no venv active whose ``python3`` is ``python3``."""
    assert python3.name == "python3" and python3.is_file(), python3
    drop = ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON", "PYTHONPATH", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYENV")}
    env["PATH"] = os.pathsep.join(dict.fromkeys([str(python3.parent), "/usr/bin", "/bin"]))
    return {**env, **extra}


def choose_python(env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the scripts' choice of Python; prints PYTHON, then VIRTUAL_ENV and the python on PATH."""
    code = 'source scripts/python-env.sh; mnist_hpc_python; echo "$PYTHON"; echo "${VIRTUAL_ENV:-}"; command -v python'
    return subprocess.run(["bash", "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def base_python() -> Path:
    """``python3`` beside the interpreter these tests run on, outside any venv it may sit in."""
    return Path(getattr(sys, "_base_executable", sys.executable)).resolve().parent / "python3"


@pytest.mark.slow
def test_no_active_env_makes_the_project_venv_then_reuses_it(tmp_path: Path):
    venv = tmp_path / "project-venv"
    env = clean_env(base_python(), MNIST_HPC_VENV=str(venv))
    first = choose_python(env)
    assert first.returncode == 0, first.stderr
    python, active, on_path = first.stdout.split()
    assert python == str(venv / "bin" / "python") and active == str(venv)
    assert on_path == str(venv / "bin" / "python"), "the venv must come first on PATH, as after activate"
    assert f"no virtual environment is active: making one for mnist-hpc at {venv}" in first.stderr
    assert f"source {venv}/bin/activate" in first.stderr
    assert subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0
    assert (venv / ".gitignore").read_text() == "*\n"

    second = choose_python(env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split()[0] == python
    assert f"using the project's, {venv}" in second.stderr and "making" not in second.stderr


def test_an_active_venv_or_python_override_is_used_as_is(tmp_path: Path):
    active = tmp_path / "active"
    subprocess.run([str(base_python()), "-m", "venv", "--without-pip", str(active)], check=True, timeout=120)
    project = tmp_path / "project-venv"
    env = clean_env(base_python(), MNIST_HPC_VENV=str(project), VIRTUAL_ENV=str(active))
    proc = choose_python(env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.split()[0] == str(active / "bin" / "python")

    override = str(base_python())
    proc = choose_python({**env, "PYTHON": override})
    assert proc.returncode == 0 and proc.stdout.split()[0] == override
    assert not project.exists()


def test_a_broken_project_venv_is_refused_and_left_alone(tmp_path: Path):
    venv = tmp_path / "half-made"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "keep").write_text("user data\n")
    proc = choose_python(clean_env(base_python(), MNIST_HPC_VENV=str(venv)))
    assert proc.returncode == 1
    assert "is not a working virtual environment" in proc.stderr and f"rm -rf '{venv}'" in proc.stderr
    assert [p.name for p in venv.rglob("*")] == ["bin", "keep"]


def test_a_python_without_venv_names_the_command_that_installs_it(tmp_path: Path):
    # Debian and Ubuntu ship ensurepip in pythonX.Y-venv; without that package `import ensurepip`
    # fails exactly like this, while `import venv` still works.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "ensurepip.py").write_text("raise ModuleNotFoundError(\"No module named 'ensurepip'\", name='ensurepip')\n")
    venv = tmp_path / "project-venv"
    env = clean_env(base_python(), MNIST_HPC_VENV=str(venv), PYTHONPATH=str(hide))
    proc = choose_python(env)
    assert proc.returncode == 1
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert "its venv module is missing" in proc.stderr
    if shutil.which("apt-get"):
        sudo = "" if os.geteuid() == 0 else "sudo "
        assert f"install it with:  {sudo}apt install python{version}-venv" in proc.stderr
    assert not venv.exists()


# ---------------------------------------------------------------- the quickstart on the system Python


@pytest.fixture
def system_venv(tmp_path: Path) -> Iterator[Path]:
    """Where the quickstart makes its venv; removed afterwards (TensorFlow is about 1 GB)."""
    venv = tmp_path / "venv"
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


@pytest.mark.slow
def test_quickstart_on_the_system_python_makes_a_venv_and_trains(tmp_path: Path, system_venv: Path):
    """Debian's /usr/bin/python3 is externally managed: the quickstart makes a venv and trains."""
    for needed, what in ((SYSTEM_PYTHON, "the system Python"), (SHARED_MNIST, "the real MNIST")):
        if not needed.is_file():
            if IN_CI:
                pytest.fail(f"CI must have {what} at {needed}")
            pytest.skip(f"no {what} at {needed}")
    output_root = tmp_path / "out"
    env = clean_env(SYSTEM_PYTHON, MNIST_HPC_VENV=str(system_venv), MNIST_HPC_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "quickstart.sh"), str(SHARED_MNIST), "train.epochs=1",
         f"paths.output_root={output_root}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"no virtual environment is active: making one for mnist-hpc at {system_venv}" in proc.stderr

    # The venv is the system Python's, and holds exactly one TensorFlow.
    cfg = (system_venv / "pyvenv.cfg").read_text()
    assert re.search(r"^home = /usr/bin$", cfg, flags=re.M), cfg
    listing = subprocess.run([str(system_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                             capture_output=True, text=True, timeout=120)
    installed = [canonicalize_name(d["name"]) for d in json.loads(listing.stdout)]
    assert [n for n in installed if is_tensorflow(n)] == ["tensorflow-cpu"]

    from mnist_hpc import rundir

    [metrics_file] = output_root.rglob(rundir.METRICS_FILE)
    metrics = rundir.read_metrics(metrics_file.parent)
    assert metrics["epochs_completed"] == 1
    assert metrics["test_accuracy"] >= 0.9  # one epoch of the lesson on real MNIST: about 0.96
    provenance = json.loads((metrics_file.parent / rundir.PROVENANCE_FILE).read_text())
    assert provenance["python_executable"] == str(system_venv / "bin" / "python")
