"""Shared fixtures: configs composed exactly as users get them, shrunk to tiny synthetic data."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from tests.helpers import IN_CI, end_live_jobs, fill_cache, make_arrays, npz_bytes, sha, synthetic_mnist
from tests.http_fixture import LoopbackServer


@pytest.fixture
def synthetic_cache(tmp_path: Path) -> Path:
    """A cache directory holding a verified synthetic dataset."""
    cache_dir = tmp_path / "cache"
    fill_cache(cache_dir)
    return cache_dir


@pytest.fixture
def slow_cache(tmp_path: Path) -> Path:
    """Enough synthetic data that an epoch lasts about a second on one core."""
    cache = tmp_path / "cache"
    fill_cache(cache, synthetic_mnist(n_train=8000, n_test=500))
    return cache


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


# --- prefetch: a loopback server and a small dataset to serve ---


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy from the environment (it would swallow requests meant for the loopback server).

    Not autouse: the prefetch test files ask for it with ``pytestmark``.
    """
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("MNIST_HPC_CACHE", raising=False)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    """A real HTTP server on 127.0.0.1 (tests/http_fixture.py)."""
    srv = LoopbackServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def good() -> tuple[dict[str, np.ndarray], bytes, str]:
    """A small valid dataset: its arrays, its npz bytes and their sha256."""
    arrays = make_arrays()
    data = npz_bytes(arrays)
    return arrays, data, sha(data)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """Where a prefetch test's cache goes (not created); test files that need a filled one override it."""
    return tmp_path / "cache"


@pytest.fixture(scope="session", autouse=True)
def _end_live_jobs() -> Iterator[None]:
    """The stand-in for a running local job (helpers.live_job) ends with the session."""
    yield
    end_live_jobs()


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


# --- Slurm daemons: each Slurm test starts on a running cluster; a daemon that dies under one is named ---
#
# slurmd has segfaulted here, once in many runs. Why no rerun inside pytest: pytest has no public
# way to run an item a second time with fresh fixtures (pytest-rerunfailures does it through the
# private _pytest.runner.runtestprotocol and Item._initrequest, and chooses its reruns before the
# run or from the error text, not from a daemon's state after it). So, with public API only: a
# daemon found stopped before a Slurm test is started again (the crash does not fail every test
# after it), a failed Slurm test under which a daemon died is named in the summary, and
# scripts/test.sh reruns exactly those tests once, in a new pytest process (MNIST_HPC_RERUN_FILE).

_CALL_REPORT = pytest.StashKey["pytest.TestReport"]()
# Tests that failed while a Slurm daemon died under them: node ids, for the summary and the rerun.
_FAILED_UNDER_A_CRASH: list[str] = []
# Every test that failed (any phase), to tell whether the crash explains all failures.
_FAILED: list[str] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    from tests.helpers import HEALED

    # A new session in the same process (mutmut runs several) starts with none.
    HEALED.clear()
    _FAILED_UNDER_A_CRASH.clear()
    _FAILED.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator["pytest.TestReport"]:
    """Keep each test's call report where its fixtures can read it (pytest's documented recipe)."""
    report = yield
    if report.when == "call":
        item.stash[_CALL_REPORT] = report
    return report


@pytest.fixture(autouse=True)
def _slurm_daemons(request: pytest.FixtureRequest) -> Iterator[None]:
    """A Slurm test runs on a cluster that accepts jobs (daemons found stopped are started again;
    without a cluster the test skips locally and fails in CI); a daemon that died during a failed
    test is started again and the test named."""
    from tests.helpers import heal_crashed_daemons, require_cluster

    if request.node.get_closest_marker("slurm") is None:
        yield
        return
    require_cluster()
    yield
    report = request.node.stash.get(_CALL_REPORT, None)
    if report is not None and report.failed:
        if heal_crashed_daemons(f"during {request.node.nodeid}"):
            _FAILED_UNDER_A_CRASH.append(request.node.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed and report.nodeid not in _FAILED:
        _FAILED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With MNIST_HPC_RERUN_FILE set (scripts/test.sh), write there the tests to run once more: the
    ones that failed under a crashed Slurm daemon, and only when no other test failed."""
    target = os.environ.get("MNIST_HPC_RERUN_FILE")
    if not target:
        return
    others = [nodeid for nodeid in _FAILED if nodeid not in _FAILED_UNDER_A_CRASH]
    Path(target).write_text("" if others else "".join(f"{nodeid}\n" for nodeid in _FAILED_UNDER_A_CRASH))


def pytest_terminal_summary(terminalreporter: "pytest.TerminalReporter") -> None:
    from tests.helpers import HEALED

    if HEALED:
        terminalreporter.section("Slurm daemons that died under the tests and were started again")
        for when, status in HEALED:
            terminalreporter.write_line(f"{when}:\n{status}")
        for nodeid in _FAILED_UNDER_A_CRASH:
            terminalreporter.write_line(f"failed while a daemon died under it (scripts/test.sh reruns it once): {nodeid}")
