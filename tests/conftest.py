"""Shared fixtures: configs composed exactly as users get them, shrunk to tiny synthetic data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from mnist_hpc.io import sha256_file

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist.npz"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def synthetic_mnist(n_train: int = 600, n_test: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """Learnable MNIST-shaped data: each class is a fixed random template plus noise."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, 28, 28))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 10
        rng.shuffle(y)
        noise = rng.integers(-60, 61, size=(n, 28, 28))
        x = np.clip(templates[y] + noise, 0, 255).astype(np.uint8)
        return x, y.astype(np.uint8)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def fill_cache(cache_dir: Path, arrays: Optional[dict[str, np.ndarray]] = None) -> Path:
    """Put a dataset into ``cache_dir`` through the real prefetch import (``--from``)."""
    from mnist_hpc.login.prefetch.fetch import prefetch

    source = write_npz(cache_dir.parent / "incoming" / "mnist.npz", arrays or synthetic_mnist())
    target = cache_dir / "mnist.npz"
    prefetch(target, source=source)
    manifest = json.loads((cache_dir / "mnist.npz.manifest.json").read_text())
    assert manifest["sha256"] == sha256_file(target)
    return target


@pytest.fixture
def synthetic_cache(tmp_path: Path) -> Path:
    """A cache directory holding a verified synthetic dataset."""
    cache_dir = tmp_path / "cache"
    fill_cache(cache_dir)
    return cache_dir


@pytest.fixture
def compose() -> Callable[..., object]:
    """Compose the real ``conf/`` with overrides, as ``mnist-hpc-train`` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mnist_hpc.config import conf_dir, register_configs

    register_configs()

    def _compose(overrides: list[str] = (), return_hydra_config: bool = False):  # type: ignore[assignment]
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)

    return _compose


def tiny_overrides(cache_dir: Path, output_root: Path) -> list[str]:
    """Overrides that make a run take seconds: synthetic cache, 1 epoch, small batches."""
    return [
        f"data.cache_dir={cache_dir}",
        f"paths.output_root={output_root}",
        "train.epochs=1",
        "train.batch_size=32",
    ]


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """Mount tmpfs file systems of a given size under ``tmp_path`` (root only); unmounted afterwards.

    Where mounting is impossible the test skips, except under CI (root there), where it fails.
    """
    import shutil
    import subprocess

    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True) if shutil.which("mount") else None
        if proc is None or proc.returncode != 0:
            message = f"cannot mount a tmpfs ({proc.stderr.strip() if proc else 'no mount(8)'}); run as root"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """Each test trains as a new process would: no compiled engine kept from an earlier test's
    trial, no cache arrays inflated by one (tests that want them keep them within the test)."""
    from mnist_hpc import cache
    from mnist_hpc.compute import engine

    engine.forget_warm()
    cache._inflated = None
    yield


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs(request: pytest.FixtureRequest):
    """After a test, its Slurm jobs still queued or running (submitted from its tmp_path) are cancelled.

    A test that fails half-way would otherwise leave jobs that hold CPUs, or wait for more than
    the cluster has, under every test after it.
    """
    yield
    if request.node.get_closest_marker("slurm") is None:
        return  # only Slurm tests submit jobs; the others never wait on a controller that may be down
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if tmp is None or shutil.which("squeue") is None:
        return
    out = subprocess.run(["squeue", "-h", "-o", "%A %Z"], capture_output=True, text=True, timeout=30).stdout
    mine = [line.split()[0] for line in out.splitlines() if len(line.split()) == 2 and line.split()[1].startswith(str(tmp))]
    if mine:
        subprocess.run(["scancel", *mine], capture_output=True, timeout=30)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]):
    """A Slurm test that failed because a Slurm daemon crashed under it runs once more.

    Only then: after a failure, ``cluster.sh status`` must show a daemon stopped (a crash of
    Slurm itself, not of our code, whose jobs cannot stop a daemon); the daemon is started
    again and the test rerun from scratch. The summary lists every such restart.
    """
    if item.get_closest_marker("slurm") is None:
        return None
    from _pytest.runner import runtestprotocol

    from tests.slurm_helpers import heal_crashed_daemons

    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    if any(r.failed for r in reports) and heal_crashed_daemons(f"during {item.nodeid}"):
        item._initrequest()  # fresh fixtures for the second run, as for the first
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_terminal_summary(terminalreporter) -> None:
    from tests.slurm_helpers import HEALED

    if HEALED:
        terminalreporter.section("Slurm daemons that died under the tests and were started again")
        for when, status in HEALED:
            terminalreporter.write_line(f"{when}:\n{status}")
