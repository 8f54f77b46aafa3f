"""Plain helpers and constants that more than one test file uses: the one place to import them from.

Fixtures stay in ``conftest.py``; a test file imports helpers from here (or the two single-topic
modules ``http_fixture`` and ``local_workers``), never from another test file or from conftest
(``tests/test_suite_layout.py`` checks this). Sections by topic, so that each stays easy to find.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import numpy as np
import pytest

from mnist_hpc import rundir
from mnist_hpc.io import sha256_file, utc_now

T = TypeVar("T")

# --- paths and environment ---

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist.npz"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# --- data and caches ---


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


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of an npz file holding ``arrays`` (what a download would deliver)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fill_cache(cache_dir: Path, arrays: Optional[dict[str, np.ndarray]] = None) -> Path:
    """Put a dataset into ``cache_dir`` through the real prefetch import (``--from``)."""
    from mnist_hpc.login.prefetch.fetch import prefetch

    source = write_npz(cache_dir.parent / "incoming" / "mnist.npz", arrays or synthetic_mnist())
    target = cache_dir / "mnist.npz"
    prefetch(target, source=source)
    manifest = json.loads((cache_dir / "mnist.npz.manifest.json").read_text())
    assert manifest["sha256"] == sha256_file(target)
    return target


def make_arrays(n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny MNIST look-alike: uint8 images (N, 28, 28), labels 0-9."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }


def listing(directory: Path) -> list[str]:
    """Everything in a directory (hidden names included); [] when it does not exist."""
    return sorted(os.listdir(directory)) if directory.exists() else []


def assert_clean(cache_dir: Path, *, allowed: tuple[str, ...] = ()) -> None:
    """The cache directory holds nothing but ``allowed``, the lock file and the objects behind them.

    Each allowed npz is the link to its current object, and its object store holds only
    complete objects, each named by its own sha256: no partial, temporary or staging file.
    """
    from mnist_hpc.cache import manifest_path, objects_dir, view_target
    from mnist_hpc.login.prefetch import store

    expected = set(allowed)
    for name in allowed:
        if name.endswith(".npz"):
            target = cache_dir / name
            digest = json.loads(manifest_path(target).read_text())["sha256"]
            assert os.readlink(target) == view_target(target, digest)
            stored = listing(objects_dir(target))
            assert f"{digest}.npz" in stored
            for obj in stored:
                assert obj == f"{sha256_file(objects_dir(target) / obj)}.npz", obj
            expected.add(objects_dir(target).name)
    assert set(listing(cache_dir)) - {store.LOCK_NAME} == expected


def tiny_overrides(cache_dir: Path, output_root: Path) -> list[str]:
    """Overrides that make a run take seconds: synthetic cache, 1 epoch, small batches."""
    return [
        f"data.cache_dir={cache_dir}",
        f"paths.output_root={output_root}",
        "train.epochs=1",
        "train.batch_size=32",
    ]


# --- the commands, run as users run them ---

TRAIN_CODE = "from mnist_hpc.cli import train_main; train_main()"
STATUS_CODE = "from mnist_hpc.cli import status_main; status_main()"
REPORT_CODE = "from mnist_hpc.cli import report_main; report_main()"
TRAIN = [sys.executable, "-c", TRAIN_CODE]
STATUS = [sys.executable, "-c", STATUS_CODE]
REPORT = [sys.executable, "-c", REPORT_CODE]


def train_cli(args: list[str], cwd: Path, timeout: float = 300, **popen: Any) -> subprocess.CompletedProcess:
    return subprocess.run(TRAIN + args, capture_output=True, text=True, timeout=timeout, cwd=cwd, **popen)


def run_to_files(cmd: list[str], tmp_path: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cmd``; its output is read back from files in ``tmp_path``."""
    # Files, not pipes: local jobs inherit the descriptors and would keep a pipe open.
    out, err = tmp_path / f"out-{time.monotonic_ns()}", tmp_path / f"err-{time.monotonic_ns()}"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.run(cmd, stdout=fo, stderr=fe, text=True, timeout=timeout)
    proc.stdout, proc.stderr = out.read_text(), err.read_text()
    return proc


def report_csv(target: Path) -> tuple[subprocess.CompletedProcess, list[dict[str, str]]]:
    """``mnist-hpc-report TARGET`` (it must succeed) and the rows of the report.csv it wrote."""
    import csv

    proc = subprocess.run(REPORT + [str(target)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(Path(target) / "report" / "report.csv") as fh:
        return proc, list(csv.DictReader(fh))

def run_login_command(code: str, args: list[str], tmp_path: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess, bool]:
    """Run a login-node command; report whether TensorFlow got imported in that process."""
    marker = tmp_path / f"tf-imported-{time.monotonic_ns()}"
    wrapped = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write(str('tensorflow' in sys.modules)))\n"
        f"{code}\n"
    )
    # Files, not pipes: the local executor's job processes inherit the descriptors, and a pipe
    # would keep subprocess.run waiting for the jobs instead of the command.
    out, err = tmp_path / f"{marker.name}.out", tmp_path / f"{marker.name}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.run([sys.executable, "-c", wrapped, *args], stdout=fo, stderr=fe, text=True, timeout=timeout)
    proc.stdout, proc.stderr = out.read_text(), err.read_text()
    return proc, marker.read_text() == "True"


def sweep_args(cache: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["-m", *tiny_overrides(cache, tmp_path / "out"), f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra]


def search_args(cache: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["-m", "hparams_search=optuna", "hydra/launcher=local", f"hydra.sweep.dir={tmp_path / 'search'}",
            *tiny_overrides(cache, tmp_path / "out"), *extra]


def subprocess_env() -> dict[str, str]:
    """This environment without proxies or a cache override, with the checkout importable."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.pop("MNIST_HPC_CACHE", None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def assert_one_line_refusal(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 1, the message on stderr, no traceback."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-2000:]


# --- waiting for a condition (a bound on waiting, never an assertion on speed) ---


def until(condition: Callable[[], T], what: str, timeout_s: float = 600.0, every_s: float = 0.05) -> T:
    """Poll ``condition`` until it holds (its value), or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def wait_for_file(path: Path, timeout_s: float = 600) -> None:
    until(path.exists, f"{path} to appear", timeout_s)


# --- training results ---


class Interrupt(Exception):
    """Stands in for a job killed mid-run."""


def interrupter(at_epoch: int, at_batch: int | None = None):
    """A callback that raises before epoch ``at_epoch`` (0-based) or after one of its batches."""
    import keras

    class Stop(keras.callbacks.Callback):
        epoch = -1

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            if at_batch is None and epoch == at_epoch:
                raise Interrupt(f"stopped before epoch {epoch + 1}")

        def on_train_batch_end(self, batch, logs=None):
            if at_batch is not None and self.epoch == at_epoch and batch == at_batch:
                raise Interrupt(f"stopped in epoch {at_epoch + 1} after batch {batch + 1}")

    return Stop()


def weights(run_dir: Path) -> list[np.ndarray]:
    """The trained model's weights, as saved in the run directory."""
    import keras

    return keras.models.load_model(Path(run_dir) / rundir.MODEL_FILE).get_weights()


def strip_seconds(history: list[dict]) -> list[dict]:
    """A history without its timings (the only values two identical runs may differ in)."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def digests(text: str) -> list[str]:
    """The sha256 of the trained weights that each worker logged, in log order."""
    return re.findall(r"trained weights: sha256 ([0-9a-f]{64})", text)

def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` and its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


# --- Hydra composition ---


@contextlib.contextmanager
def composing(tmp_path: Path, *cli: str) -> Iterator[tuple[Any, Any]]:
    """Hydra's config loader and a multirun master config, as ``mnist-hpc-train -m CLI`` builds them."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals
    from hydra.types import RunMode

    from hydra_plugins.mnist_hpc_launcher.launcher import register_plugins
    from mnist_hpc.config import conf_dir, register_configs

    register_configs()
    register_plugins()
    setup_globals()
    common = [f"data.cache_dir={tmp_path}", f"paths.output_root={tmp_path}", "hydra/launcher=slurm"]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        yield loader, loader.load_configuration("config", overrides=common + list(cli), run_mode=RunMode.MULTIRUN)


# --- Optuna searches ---


def wait_for_study(search_dir: Path, counted: int, timeout_s: float = 600) -> list[Any]:
    """The study's trials once ``counted`` of them count toward the budget and none is running."""
    import optuna
    from optuna.trial import TrialState

    from mnist_hpc import search as sd

    deadline = time.time() + timeout_s
    trials: list = []
    while time.time() < deadline:
        if sd.journal_path(search_dir).is_file():
            study = optuna.load_study(study_name="mnist-hpc", storage=sd.open_storage(search_dir))
            trials = study.get_trials()
            if sum(sd.counts_toward_budget(t) for t in trials) >= counted and not any(
                t.state == TrialState.RUNNING for t in trials
            ):
                return trials
        time.sleep(1)
    raise AssertionError(f"the study did not reach {counted} trials in {timeout_s}s: {[(t.number, t.state) for t in trials]}")


# --- trial directories built by hand (for status, report and the readers) ---

# The labels of the fake test set: ten of each digit.
Y_TRUE = np.repeat(np.arange(10), 10)
# Local jobs that still run: ``sleep`` processes, ended by conftest after the session.
_LIVE_JOBS: list[subprocess.Popen] = []


def live_job() -> str:
    """The job id of a local job that still runs (the same one each call within a test session)."""
    if not _LIVE_JOBS:
        _LIVE_JOBS.append(subprocess.Popen(["sleep", "3600"]))
    return str(_LIVE_JOBS[0].pid)


def end_live_jobs() -> None:
    for proc in _LIVE_JOBS:
        proc.kill()
        proc.wait()
    _LIVE_JOBS.clear()  # a later session in the same process (mutmut's) starts its own


def epoch_record(epoch: int, acc: float, val: float) -> dict[str, float]:
    """One epoch of history as training records it."""
    return {"epoch": epoch, "accuracy": acc, "loss": 0.2, "val_accuracy": val, "val_loss": 0.15, "seconds": 2.85}


def fake_history(best_val: Optional[float], final_val: Optional[float], epochs: int = 3) -> list[dict[str, float]]:
    """Per-epoch records that peak at ``best_val`` and end at ``final_val`` (no validation when None)."""
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "accuracy": 0.9 + 0.02 * e, "loss": 0.3 / e, "seconds": 1.5}
        if best_val is not None:
            row["val_accuracy"] = best_val if e == epochs - 1 else (final_val if e == epochs else best_val - 0.05)
            row["val_loss"] = 0.2 / e
        rows.append(row)
    return rows


def fake_metrics(
    test: float, best_val: Optional[float] = None, final_val: Optional[float] = None, wall: float = 42.0
) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "test_loss": 0.1,
        "test_accuracy": test,
        "epochs_completed": 3,
        "history": fake_history(best_val, final_val),
        "train_time_s": wall - 5,
        "wall_time_s": wall,
        "trainable_params": 407050,
        "threads": {"intra_op_threads": 2, "inter_op_threads": 2},
    }
    if best_val is not None:
        metrics.update(val_accuracy=final_val, best_val_accuracy=best_val)
    return metrics


def fake_predictions(run_dir: Path, mistakes: dict[int, tuple[int, float]]) -> None:
    """predictions.npz through the real writer, with exactly the given mistakes."""
    from mnist_hpc.rundir import write_predictions

    prob = np.full((Y_TRUE.size, 10), 0.01, dtype=np.float32)
    prob[np.arange(Y_TRUE.size), Y_TRUE] = 0.91
    for index, (pred, conf) in mistakes.items():
        prob[index] = (1 - conf) / 9
        prob[index, pred] = conf
    # A distinct blob per sample so the wrong-digit images are not blank.
    rng = np.random.default_rng(0)
    x_test = rng.random((Y_TRUE.size, 784)).astype(np.float32) ** 3
    write_predictions(run_dir, Y_TRUE, prob, x_test)


def make_trial(
    sweep: Path,
    num: int,
    overrides: list[str],
    *,
    cluster: str = "local",
    job_id: Optional[str] = None,
    with_job: bool = True,
    metrics: Optional[dict[str, Any]] = None,
    mistakes: Optional[dict[int, tuple[int, float]]] = None,
    started_epochs: Optional[int] = None,
    epochs_logged: tuple[dict[str, float], ...] = (),
    stderr: Optional[str] = None,
    ended: bool = False,
    packed_slot: Optional[int] = None,
    failure: Optional[BaseException] = None,
    submitted: Optional[str] = None,
) -> Path:
    """One trial directory as the launcher and a training job leave it (through their own writers).

    ``submitted``: job.json's record of when its job was queued; by default now, as the launcher
    writes it right after sbatch (status shows a Slurm job as the trial's only if it held the id then).
    """
    from mnist_hpc import claim, rundir

    run_dir = sweep / str(num)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    job_id = job_id or str(1000 + num)
    folder = sweep / ".submitit" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    if with_job:
        rundir.write_job(
            run_dir,
            rundir.JobRecord(
                cluster=cluster,
                job_id=job_id,
                run_dir=str(run_dir),
                overrides=overrides,
                trial=num,
                array_job_id=job_id.partition("_")[0] if "_" in job_id else None,
                array_task_id=int(job_id.partition("_")[2]) if "_" in job_id else None,
                packed_slot=packed_slot,
                stdout=str(folder / f"{job_id}_0_log.out"),
                stderr=str(folder / f"{job_id}_0_log.err"),
                submitit_folder=str(folder),
                submitted=utc_now() if submitted is None else submitted,
                # A local job is its process: status asks whether it still runs.
                **({"host": socket.gethostname(), "pid_start": claim.process_start(int(job_id))} if job_id == live_job() else {}),
            ),
        )
    if started_epochs is not None:
        done = list(metrics["history"]) if metrics is not None else list(epochs_logged)
        rundir.write_progress(run_dir, len(done), started_epochs, done)
    if stderr is not None:
        (folder / f"{job_id}_0_log.err").write_text(stderr)
    if ended:
        # submitit's result pickle: the job's process has ended (status reads its presence only).
        (folder / f"{job_id}_0_result.pkl").write_bytes(b"")
    if failure is not None:
        rundir.write_failure(run_dir, failure)
    if mistakes is not None:
        fake_predictions(run_dir, mistakes)
    if metrics is not None:
        rundir.write_metrics(run_dir, metrics)
    return run_dir


def hydra_trial_dir(run_dir: Path, overrides: list[str]) -> Path:
    """A trial directory as Hydra leaves it (its overrides and nothing else), for the readers' sake."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run_dir


# --- preconditions and real Unix users (tests run as root make them) ---


class Precondition(RuntimeError):
    """A reproduction did not set up what it needs: an error of the test, never the expected failure."""


def precondition(condition: object, message: str) -> None:
    if not condition:
        raise Precondition(message)


def need(ok: bool, problem: str) -> None:
    """Skip locally when ``problem`` stops a root-only test; under CI (root there) fail instead."""
    if not ok:
        if IN_CI:
            pytest.fail(f"{problem}; CI runs as root and must run the shared-cache test")
        pytest.skip(problem)


GROUP = "mnisthpc-share"
USERS = ("mnisthpc-a", "mnisthpc-b")
SYSTEM_PYTHON = Path("/usr/bin/python3")


def ensure_users() -> None:
    """The shared group and two users in it, each with a private primary group (created if missing)."""
    if subprocess.run(["getent", "group", GROUP], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", GROUP], check=True, capture_output=True)
    for user in USERS:
        if subprocess.run(["getent", "passwd", user], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--no-create-home", "--user-group", "--groups", GROUP,
                            "--shell", "/usr/sbin/nologin", user], check=True, capture_output=True)


# A venv any user can run (under /var/tmp: /root is private) with TensorFlow, so that a job of
# another user's trains to the end.
JOB_VENV = Path("/var/tmp/mnist-hpc-test-guard-venv")
JOB_PACKAGES = ("numpy", "hydra-core", "omegaconf", "submitit", "cloudpickle", "keras", "tensorflow-cpu", "tensorboard",
                "pooch", "requests", "tqdm")
GATED_PYTHON = """#!/bin/bash
# tests/test_job_guard.py: a local job's processes wait here until the test releases the job (a
# file named after its id in $MNIST_HPC_TEST_GATE), as `sbatch --hold` lets a Slurm test act
# between submission and start. sys.executable stays this script (exec -a), so the launcher
# gives it to the jobs it queues.
if [ "${SUBMITIT_EXECUTOR:-}" = local ] && [ -n "${MNIST_HPC_TEST_GATE:-}" ]; then
    gate="$MNIST_HPC_TEST_GATE/${SUBMITIT_LOCAL_JOB_ID:-$$}"
    for _ in $(seq 3000); do [ -e "$gate" ] && break; sleep 0.1; done
fi
exec -a "$0" "$(dirname "$0")/python3" "$@"
"""


def pinned_venv(venv: Path, packages: Sequence[str]) -> Path:
    """A venv any user can run, holding this environment's versions of ``packages`` (kept between
    runs in ``venv``, rebuilt when a pinned version changes); returns its python."""
    import importlib.metadata

    pins = sorted(f"{name}=={importlib.metadata.version(name)}" for name in packages)
    marker = venv / "mnist-hpc-pins.txt"
    python = venv / "bin" / "python"
    if python.exists() and marker.exists() and marker.read_text().split() == pins:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    old = os.umask(0o022)  # world-readable, whatever the caller's umask
    try:
        subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], check=True, capture_output=True)
        result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(pins)} failed:\n{result.stderr[-2000:]}")
        marker.write_text("\n".join(pins) + "\n")
    finally:
        os.umask(old)
    return python


def ensure_job_venv() -> Path:
    """A venv any user can run, with this environment's versions of what a training job imports,
    and its gated python (see :data:`GATED_PYTHON`)."""
    pinned_venv(JOB_VENV, JOB_PACKAGES)
    gated = JOB_VENV / "bin" / "gated-python"
    if not gated.exists() or gated.read_text() != GATED_PYTHON:
        gated.write_text(GATED_PYTHON)
        os.chmod(gated, 0o755)
    return gated


# --- Slurm (the local cluster started by slurm/cluster.sh) ---

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Slurm daemons this test run found dead and started again: (when, what status showed), for the summary.
HEALED: list[tuple[str, str]] = []


def cluster_status() -> "subprocess.CompletedProcess[str] | None":
    """``slurm/cluster.sh status`` (exit 0: the cluster accepts jobs), or None without Slurm's commands."""
    if shutil.which("sinfo") is None:
        return None
    return subprocess.run([str(REPO / "slurm" / "cluster.sh"), "status"], capture_output=True, text=True, timeout=60)


def heal_crashed_daemons(when: str) -> bool:
    """Start again a Slurm daemon that died under the tests (slurmd has segfaulted here, once in many runs).

    Only a daemon that status shows *stopped* is a crash to heal; any other trouble (a drained or
    planned node, a refused test submission) is left for the test to report. Needs root. Every
    restart is listed in the test session's summary.
    """
    status = cluster_status()
    if status is None or status.returncode == 0 or os.geteuid() != 0:
        return False
    if not any(line.strip().endswith("stopped") or "stopped (" in line for line in status.stdout.splitlines()):
        return False
    HEALED.append((when, status.stdout.strip()))
    started = subprocess.run([str(REPO / "slurm" / "cluster.sh"), "start"], capture_output=True, text=True, timeout=300)
    return started.returncode == 0


def require_cluster() -> None:
    """Skip locally without a cluster; in CI a missing cluster is a failure that says what was seen."""
    status = cluster_status()
    if status is not None and status.returncode != 0 and heal_crashed_daemons("before a test"):
        status = cluster_status()
    if status is None or status.returncode != 0:
        message = "no local Slurm cluster: run `slurm/cluster.sh start` (as root)"
        if status is not None:
            queue = subprocess.run(["squeue", "-o", "%i %T %r %D %j"], capture_output=True, text=True, timeout=30)
            message += f"\ncluster.sh status:\n{status.stdout}{status.stderr}squeue:\n{queue.stdout}{queue.stderr}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def slurm_associate(*users: str) -> None:
    """Let ``users`` (created by :func:`ensure_users`, maybe after the cluster started) submit jobs:
    the local cluster enforces associations (``slurm/cluster.sh add-user``)."""
    added = subprocess.run([str(REPO / "slurm" / "cluster.sh"), "add-user", *users], capture_output=True, text=True,
                           timeout=300)
    assert added.returncode == 0, added.stdout + added.stderr


def sh(*cmd: str) -> str:
    """A Slurm client's (or any command's) stdout; it must succeed."""
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=True).stdout


def slurm_launcher_args(sweep_dir: Path, *extra: str) -> list[str]:
    """Submission arguments sized for this 2-core test node."""
    return [
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep_dir}",
        *extra,
    ]


def submit(args: list[str], tmp_path: Path, timeout: float = 120, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Submit from ``tmp_path``; ``env`` is the submitting shell's environment (the jobs inherit it)."""
    return subprocess.run(TRAIN + args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)


def job_records(sweep_dir: Path) -> list[dict]:
    files = sorted(sweep_dir.glob("*/job.json"), key=lambda p: int(p.parent.name))
    return [json.loads(p.read_text()) for p in files]


def sacct_states(job_ids: Iterable[str]) -> dict[str, str]:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
        capture_output=True, text=True, timeout=30,
    ).stdout
    states: dict[str, str] = {}
    for line in out.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id] = state.split()[0] if state else ""
    return states


def wait_for_states(job_ids: list[str], timeout_s: float = 300) -> dict[str, str]:
    """Poll sacct until every job is in a terminal state."""
    deadline = time.time() + timeout_s
    states: dict[str, str] = {}
    while time.time() < deadline:
        states = sacct_states(job_ids)
        if all(states.get(j) in TERMINAL for j in job_ids):
            return states
        time.sleep(2)
    raise AssertionError(f"jobs did not end within {timeout_s}s: {states}")


def squeue_ids(workdir: Path | None = None) -> set[str]:
    """Job ids in the queue; with ``workdir``, only jobs submitted from that directory."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%Z"], capture_output=True, text=True, timeout=30).stdout
    rows = [line.strip().split("|", 1) for line in out.splitlines() if "|" in line]
    return {job for job, wd in rows if workdir is None or Path(wd) == Path(workdir)}


def status_rows(target: Path | str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "mnist_hpc.login.status", "--json", str(target)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def restarts(job_id: str) -> int:
    """How often Slurm requeued ``job_id`` (scontrol's Restarts field)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    for token in out.split():
        if token.startswith("Restarts="):
            return int(token.split("=")[1])
    raise AssertionError(f"no Restarts field for {job_id}: {out[:300]}")


def sacct_history(job_id: str) -> list[str]:
    """Every run of a job, requeued ones included (-D)."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job_id],
                         capture_output=True, text=True, timeout=30).stdout
    return [line.split("|")[1].split()[0] for line in out.splitlines() if line.split("|")[0] == job_id]


# --- run files ---
#
# What a test reads from (or plants in) a run directory goes through mnist_hpc.rundir: its readers
# where it has one (rundir.read_metrics, rundir.read_job, ...), its names (rundir.METRICS_FILE,
# rundir.checkpoint_path, ...), and these helpers for what only tests read. No test spells a run
# file's name, so a renamed file is one change in rundir.


def run_log(run_dir: Path) -> str:
    """The run's job log (people's, which no code parses); '' while there is none."""
    path = Path(run_dir) / rundir.LOG_FILE
    return path.read_text() if path.is_file() else ""


def finished_metrics(run_dir: Path) -> dict[str, Any]:
    """The finished run's metrics (:func:`mnist_hpc.rundir.read_metrics`: every field checked)."""
    metrics = rundir.read_metrics(run_dir)
    assert metrics is not None, f"{Path(run_dir) / rundir.METRICS_FILE} is absent: the run has not finished"
    return metrics


def run_json(run_dir: Path, name: str) -> Any:
    """A run file's JSON as it is on disk (``name``: one of rundir's names), for what no reader returns
    whole: provenance, a failure's traceback, a lease's time."""
    return json.loads((Path(run_dir) / name).read_text())


def checkpoint_positions(run_dir: Path) -> list[tuple[int, int]]:
    """(epochs, batches) of each checkpoint in the run directory, furthest along first."""
    return [rundir.checkpoint_position(p.name) for p in rundir.list_checkpoints(run_dir)]


def resume_line(epoch: int, batch: int) -> str:
    """The start of the log line of a run that resumed from its checkpoint at (epoch, batch)."""
    return f"resuming from {rundir.checkpoint_name(epoch, batch)}"


def resumed_from(log: str) -> list[tuple[int, int]]:
    """(epochs, batches) of each checkpoint a log says its run resumed from, in the log's order."""
    names = re.findall(r"resuming from (\S+?): ", log)
    return [position for name in names if (position := rundir.checkpoint_position(name)) is not None]
