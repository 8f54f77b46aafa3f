"""TensorBoard event files in every run: read back with TensorFlow's reader and compared with
history.csv, for a plain run and for one interrupted and resumed (no epoch twice)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mnist_hpc import rundir
from mnist_hpc.rundir import TENSORBOARD_DIR
from mnist_hpc.compute.train import train_and_evaluate
from mnist_hpc.config import to_typed
from tests.helpers import Interrupt, finished_metrics, interrupter, tiny_overrides


def read_events(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, object]]:
    """Scalars by tag as (step, value) in file order, and the hyperparameters of the HParams record."""
    import tensorflow as tf

    scalars: dict[str, list[tuple[int, float]]] = {}
    hparams: dict[str, object] = {}
    for path in sorted((run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                if plugin == "hparams":
                    from tensorboard.plugins.hparams import plugin_data_pb2

                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        for key, v in data.session_start_info.hparams.items():
                            hparams[key] = v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                    continue
                scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return scalars, hparams


def history_csv(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / rundir.HISTORY_FILE) as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def assert_events_match_history(run_dir: Path, epochs: int) -> dict[str, list[tuple[int, float]]]:
    scalars, hparams = read_events(run_dir)
    rows = history_csv(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "seconds"):
        assert [step for step, _ in scalars[f"epoch/{key}"]] == list(range(1, epochs + 1)), key  # each epoch once
        np.testing.assert_allclose([v for _, v in scalars[f"epoch/{key}"]], [r[key] for r in rows], rtol=1e-6)
    assert [v for _, v in scalars["epoch/learning_rate"]] == pytest.approx([1e-3] * epochs)
    metrics = finished_metrics(run_dir)
    for key in ("test_accuracy", "test_loss", "best_val_accuracy"):
        assert scalars[f"final/{key}"] == [(epochs, pytest.approx(metrics[key]))]
    assert hparams["optimizer.learning_rate"] == pytest.approx(1e-3)
    assert hparams["model.hidden_units"] == "[512]" and hparams["train.epochs"] == epochs
    return scalars


@pytest.mark.slow
def test_a_run_writes_its_epochs_and_hparams(compose, synthetic_cache, tmp_path):
    cfg = to_typed(compose(tiny_overrides(synthetic_cache, tmp_path) + ["train.epochs=3", "data.validation_split=0.1"]))
    train_and_evaluate(cfg, tmp_path / "run")
    assert_events_match_history(tmp_path / "run", 3)


@pytest.mark.slow
def test_a_resumed_run_shows_each_epoch_once(compose, synthetic_cache, tmp_path):
    cfg = to_typed(compose(tiny_overrides(synthetic_cache, tmp_path) + ["train.epochs=3", "data.validation_split=0.1"]))
    run_dir = tmp_path / "run"
    # Epochs 1 and 2 written, then the run is cut in epoch 3 (after batch 5: past the last checkpoint).
    with pytest.raises(Interrupt):
        train_and_evaluate(cfg, run_dir, callbacks=[interrupter(at_epoch=2, at_batch=5)])
    before, _ = read_events(run_dir)
    assert [s for s, _ in before["epoch/loss"]] == [1, 2]
    train_and_evaluate(cfg, run_dir)
    assert_events_match_history(run_dir, 3)


@pytest.mark.slow
def test_tensorboard_on_a_sweep_directory_shows_every_trial(compose, synthetic_cache, tmp_path):
    """The login node's view: a real ``tensorboard --logdir SWEEP_DIR`` on loopback lists each trial and
    its HParams session."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    sweep = tmp_path / "sweep"
    for trial, lr in enumerate(("1e-3", "3e-4")):
        cfg = to_typed(compose(tiny_overrides(synthetic_cache, tmp_path) + [f"optimizer.learning_rate={lr}"]))
        train_and_evaluate(cfg, sweep / str(trial))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("tensorboard") or sys.executable
    cmd = [exe] if exe != sys.executable else [sys.executable, "-m", "tensorboard.main"]
    server = subprocess.Popen([*cmd, "--logdir", str(sweep), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        runs: list[str] = []
        while time.time() < deadline and len(runs) < 2:
            assert server.poll() is None, server.stderr.read()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as response:
                    runs = json.loads(response.read())
            except OSError:
                pass
            time.sleep(0.5)
        assert sorted(runs) == ["0/tensorboard", "1/tensorboard"]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/data/plugin/hparams/session_groups",
            data=json.dumps({"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
                             "colParams": [], "startIndex": 0, "sliceSize": 10}).encode(),
            headers={"Content-Type": "application/json"},
        )
        deadline = time.time() + 60
        groups: list = []
        while time.time() < deadline and len(groups) < 2:
            with urllib.request.urlopen(request, timeout=10) as response:
                groups = json.loads(response.read()).get("sessionGroups", [])
            time.sleep(0.5)
        rates = sorted(g["hparams"]["optimizer.learning_rate"] for g in groups)
        assert rates == pytest.approx([3e-4, 1e-3])
    finally:
        server.terminate()
        server.wait(timeout=30)


# --- <run dir>/tensorboard that the run cannot use: one line, the user's things left alone (issue I8) --


def read_only_tensorboard(small_tmpfs, tmp_path: Path, run_dir: Path) -> Path:
    """``<run_dir>/tensorboard`` (under ``tmp_path``) as a read-only mount holding an earlier event file."""
    import subprocess

    board = small_tmpfs(str((run_dir / TENSORBOARD_DIR).relative_to(tmp_path)), "1m")
    (board / "events.out.tfevents.earlier").write_bytes(b"earlier events")
    subprocess.run(["mount", "-o", "remount,ro", str(board)], check=True, capture_output=True)
    return board


@pytest.mark.slow
def test_a_tensorboard_that_is_a_file_or_read_only_stops_an_in_process_run_in_one_line(synthetic_cache, tmp_path, small_tmpfs):
    from tests.helpers import assert_one_line_refusal, train_cli

    args = tiny_overrides(synthetic_cache, tmp_path / "out") + ["data.validation_split=0.1"]
    plain = tmp_path / "runs" / "plain"
    plain.mkdir(parents=True)
    (plain / TENSORBOARD_DIR).write_text("a user's notes")
    proc = train_cli(args + [f"hydra.run.dir={plain}"], tmp_path)
    # The run directory's layout is checked before Hydra writes there (rundir.layout_problems).
    assert_one_line_refusal(
        proc, f"{plain / TENSORBOARD_DIR} is not a directory, but the run keeps its {TENSORBOARD_DIR}/ there; move it out of {plain}")
    assert (plain / TENSORBOARD_DIR).read_text() == "a user's notes"
    assert not (plain / rundir.METRICS_FILE).exists() and not (plain / rundir.CHECKPOINT_DIR).exists()
    # Done as the message says: the run goes on, the notes are where the user moved them.
    (plain / TENSORBOARD_DIR).rename(tmp_path / "notes")
    proc = train_cli(args + [f"hydra.run.dir={plain}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_events_match_history(plain, 1)
    assert (tmp_path / "notes").read_text() == "a user's notes"

    read_only = tmp_path / "runs" / "read-only"
    board = read_only_tensorboard(small_tmpfs, tmp_path, read_only)
    proc = train_cli(args + [f"hydra.run.dir={read_only}"], tmp_path)
    assert_one_line_refusal(
        proc, f"cannot write the run's TensorBoard directory {board} (Read-only file system); make it writable (or "
        "remove it) and run again with the same overrides")
    assert [p.name for p in board.iterdir()] == ["events.out.tfevents.earlier"]
    assert not (read_only / rundir.METRICS_FILE).exists()


@pytest.mark.slow
def test_a_tensorboard_that_is_a_file_or_read_only_is_refused_or_the_failure_json_of_a_launched_trial(
        synthetic_cache, tmp_path, small_tmpfs):
    from tests.helpers import TRAIN_CODE, run_login_command

    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / TENSORBOARD_DIR).write_text("a user's notes")
    board = read_only_tensorboard(small_tmpfs, tmp_path, sweep / "1")
    args = ["-m", "hydra/launcher=local", "hydra.launcher.wait=true", *tiny_overrides(synthetic_cache, tmp_path / "out"),
            f"hydra.sweep.dir={sweep}", "train.seed=1,2"]
    # A file where the run keeps its event files: refused before anything is queued, the file kept.
    proc, _ = run_login_command(TRAIN_CODE, args, tmp_path, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"nothing was queued:\n  trial 0: {sweep / '0' / TENSORBOARD_DIR} is not a directory, but the run keeps its "
            f"{TENSORBOARD_DIR}/ there; move it out of {sweep / '0'}") in proc.stderr
    assert not (sweep / ".submitit").exists() or not any(p.name[0].isdigit() for p in (sweep / ".submitit").iterdir())
    assert (sweep / "0" / TENSORBOARD_DIR).read_text() == "a user's notes"
    # Moved out: trial 0 runs; trial 1's read-only event directory is its one-line failure.
    (sweep / "0" / TENSORBOARD_DIR).rename(tmp_path / "notes")
    proc, _ = run_login_command(TRAIN_CODE, args, tmp_path, timeout=600)
    assert proc.returncode == 1 and "1 of 2 trial(s) did not finish" in proc.stderr, proc.stderr[-3000:]
    assert finished_metrics(sweep / "0")["epochs_completed"] == 1
    error = rundir.read_failure(sweep / "1")
    assert error == (
        f"mnist_hpc.compute.tensorboard.TensorBoardError: cannot write the run's TensorBoard directory {board} (Read-only "
        "file system); make it writable (or remove it) and run again with the same overrides")
    assert [p.name for p in board.iterdir()] == ["events.out.tfevents.earlier"]
