"""The sweep report, on sweep directories built by hand: finished, failed, running and pending trials."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mnist_hpc import rundir, slurm
from mnist_hpc.login import trials as trials_mod
from mnist_hpc.login.report import build, cli, plots, ranking, tables
from tests.helpers import epoch_record, fake_metrics, fake_predictions, live_job, make_trial

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CACHE = "data.cache_dir=/scratch/u/mnist-cache"
ERROR_LINE = (
    "mnist_hpc.cache.CacheMissingError: no cached MNIST at /scratch/u/mnist-cache/mnist.npz; "
    "run `mnist-hpc-prefetch data.cache_dir=/scratch/u/mnist-cache` on a login node first"
)
PACKED_ERROR_LINE = "mnist_hpc.compute.failures.PackedTrialsFailed: 1 of 3 trials failed: 1: ValueError: ..."


def _raise_packed_failure() -> None:
    from mnist_hpc.compute.failures import PackedTrialsFailed

    raise PackedTrialsFailed("1 of 3 trials failed: 1: ValueError: ...")


def submitit_failure_log(folder: Path, function: Any) -> str:
    """The stderr that submitit itself writes when a job's function raises (its local executor)."""
    import submitit

    executor = submitit.LocalExecutor(folder=folder)
    job = executor.submit(function)
    with pytest.raises(Exception):
        job.result()
    return Path(job.paths.stderr).read_text()


@pytest.fixture(scope="module")
def failed_logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Real job logs: a job whose cache is missing, and a packed task one of whose trials failed."""
    from mnist_hpc.compute.data import load_mnist
    from mnist_hpc.config import DataConfig

    folder = tmp_path_factory.mktemp("submitit")
    logs = {
        "cache": submitit_failure_log(folder, functools.partial(load_mnist, DataConfig(cache_dir="/scratch/u/mnist-cache"))),
        "packed": submitit_failure_log(folder, _raise_packed_failure),
    }
    assert ERROR_LINE in logs["cache"] and PACKED_ERROR_LINE in logs["packed"]
    return logs


# The best trial's mistakes, index -> (predicted digit, confidence): three 4s read as 9, two 7s as 2, one 3 as 5.
BEST_MISTAKES = {40: (9, 0.97), 41: (9, 0.80), 42: (9, 0.60), 70: (2, 0.91), 71: (2, 0.55), 30: (5, 0.70)}
# Counted by hand from BEST_MISTAKES: 10 right per digit, minus the mistakes, which land off the diagonal.
BEST_MATRIX = np.array(
    [
        [10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 10, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 10, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 9, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 7, 0, 0, 0, 0, 3],
        [0, 0, 0, 0, 0, 10, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 10, 0, 0, 0],
        [0, 0, 2, 0, 0, 0, 0, 8, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 10, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 10],
    ]
)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def build_sweep(sweep: Path, failed_stderr: str) -> Path:
    """Six trials: three finished (best by val != best by test), failed, running, pending."""
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    make_trial(sweep, 0, [CACHE, "optimizer=adam", "optimizer.learning_rate=0.001"], started_epochs=3,
               metrics=fake_metrics(test=0.990, best_val=0.970, final_val=0.965, wall=61.5),
               mistakes={10: (7, 0.99), 11: (7, 0.98)}, ended=True)
    make_trial(sweep, 1, [CACHE, "optimizer=adam", "optimizer.learning_rate=0.01"], started_epochs=3,
               metrics=fake_metrics(test=0.975, best_val=0.985, final_val=0.980, wall=42.0),
               mistakes=BEST_MISTAKES, ended=True)
    make_trial(sweep, 2, [CACHE, "optimizer=sgd", "optimizer.learning_rate=0.1"], started_epochs=3,
               metrics=fake_metrics(test=0.960, best_val=0.950, final_val=0.940), mistakes={}, ended=True)
    make_trial(sweep, 3, [CACHE, "optimizer=sgd", "optimizer.learning_rate=1.0"], started_epochs=5,
               stderr=failed_stderr, ended=True)
    # Running and pending: their local job is a process that has not ended.
    make_trial(sweep, 4, [CACHE, "optimizer=adam", "optimizer.learning_rate=0.0001"], started_epochs=5,
               epochs_logged=(epoch_record(1, 0.85, 0.91), epoch_record(2, 0.90, 0.93)), job_id=live_job())
    make_trial(sweep, 5, [CACHE, "optimizer=sgd", "optimizer.learning_rate=0.01"], job_id=live_job())
    return sweep


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory: pytest.TempPathFactory, failed_logs: dict[str, str]) -> build.Report:
    sweep = build_sweep(tmp_path_factory.mktemp("rep") / "sweep", failed_logs["cache"])
    return build.build_report(sweep)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def markdown_matrix(markdown: str) -> np.ndarray:
    """The 10x10 confusion matrix back from the report's markdown table."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| true \\ pred"))
    rows = [line.strip("|").split("|")[1:] for line in lines[start + 2 : start + 12]]
    return np.array([[int(c) for c in row] for row in rows])


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 1024, path


# --- a sweep with every kind of trial -----------------------------------------------------


def test_every_trial_is_a_row_with_its_values(sweep_report: build.Report) -> None:
    rows = read_csv(sweep_report.out_dir / "report.csv")
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    assert [r["state"] for r in rows] == ["COMPLETED", "COMPLETED", "COMPLETED", "FAILED", "RUNNING", "PENDING"]
    assert rows[1]["overrides"] == f"{CACHE} optimizer=adam optimizer.learning_rate=0.01"
    # One column per swept hyperparameter; the shared cache path is not one.
    assert [r["optimizer.learning_rate"] for r in rows] == ["0.001", "0.01", "0.1", "1.0", "0.0001", "0.01"]
    assert [r["optimizer"] for r in rows] == ["adam", "adam", "sgd", "sgd", "adam", "sgd"]
    assert "data.cache_dir" not in rows[0]
    assert [float(r["best_val_accuracy"]) for r in rows[:3]] == [0.970, 0.985, 0.950]
    assert [float(r["final_val_accuracy"]) for r in rows[:3]] == [0.965, 0.980, 0.940]
    assert [float(r["test_accuracy"]) for r in rows[:3]] == [0.990, 0.975, 0.960]
    assert [float(r["wall_time_s"]) for r in rows[:2]] == [61.5, 42.0]
    assert all(r[k] == "" for r in rows[3:] for k in ("best_val_accuracy", "test_accuracy", "wall_time_s"))
    assert [(r["epochs_done"], r["epochs_planned"]) for r in rows] == [
        ("3", "3"), ("3", "3"), ("3", "3"), ("0", "5"), ("2", "5"), ("", "")
    ]
    assert [r["best"] for r in rows] == ["", "yes", "", "", "", ""]


def test_best_trial_is_chosen_by_validation_not_test(sweep_report: build.Report) -> None:
    sel = sweep_report.selection
    assert sel is not None and sel.trial is not None
    assert (sel.trial.number, sel.metric, sel.ranked, sel.warning) == (1, "val_accuracy", 3, "")
    assert "**Best trial: 1** (`optimizer=adam optimizer.learning_rate=0.01`)" in sweep_report.markdown
    assert "best validation accuracy 0.9850 (final 0.9800, test 0.9750)" in sweep_report.markdown
    # Trial 0 has the best test accuracy: ranking by test would pick it, and must say why that is wrong.
    by_test = ranking.best_trial(sweep_report.trials, "test_accuracy")
    assert by_test.trial is not None and by_test.trial.number == 0
    assert "not model selection" in by_test.warning


def test_failed_running_and_pending_trials_are_listed(sweep_report: build.Report) -> None:
    rows = {r["trial"]: r for r in read_csv(sweep_report.out_dir / "report.csv")}
    assert rows["3"]["error"] == ERROR_LINE
    assert all(rows[n]["error"] == "" for n in ("0", "1", "2", "4", "5"))
    table = [line for line in sweep_report.markdown.splitlines() if line.startswith("| 3 |")]
    assert len(table) == 1 and "| FAILED |" in table[0] and ERROR_LINE in table[0]
    lines = sweep_report.markdown.splitlines()
    assert any(line.startswith(f"| 4 | {live_job()} | RUNNING |") and "| 2/5 |" in line for line in lines)
    assert any(line.startswith(f"| 5 | {live_job()} | PENDING |") for line in lines)
    assert "6 trial(s): 3 COMPLETED, 1 FAILED, 1 RUNNING, 1 PENDING." in sweep_report.markdown


def test_confusion_matrix_of_the_best_trial(sweep_report: build.Report) -> None:
    np.testing.assert_array_equal(markdown_matrix(sweep_report.markdown), BEST_MATRIX)
    np.testing.assert_array_equal(markdown_matrix((sweep_report.out_dir / "report.md").read_text()), BEST_MATRIX)
    summary = "6 of 100 test digits wrong (6.00%); most frequent mistakes (true→pred): 4→9 (3), 7→2 (2), 3→5 (1)."
    assert summary in sweep_report.markdown


def test_plots_are_valid_pngs(sweep_report: build.Report) -> None:
    expected = {
        "learning_curves.png",
        "metric_vs_optimizer.png",
        "metric_vs_optimizer.learning_rate.png",
        "confusion_matrix.png",
        "wrong_digits.png",
    }
    assert {p.name for p in sweep_report.out_dir.glob("*.png")} == expected
    for name in expected:
        assert_png(sweep_report.out_dir / name)
    assert {p.name for p in sweep_report.files} == expected | {"report.md", "report.csv"}
    # Nothing half-written is left behind.
    assert not list(sweep_report.out_dir.glob(".*tmp*"))


def test_swept_parameters_and_curves(sweep_report: build.Report) -> None:
    swept = ranking.swept_params(sweep_report.trials)
    assert list(swept) == ["optimizer", "optimizer.learning_rate"]
    assert plots.numeric_values(swept["optimizer.learning_rate"]) == [0.001, 0.01, 0.1, 1.0, 0.0001, 0.01]
    assert plots.numeric_values(swept["optimizer"]) is None
    # The running trial's curve comes from its train.log; finished ones from metrics.json.
    running = sweep_report.trials[4]
    assert plots.learning_curve(running) == ("val_accuracy", [1, 2], [0.91, 0.93])
    finished = plots.learning_curve(sweep_report.trials[1])
    assert finished == ("val_accuracy", [1, 2, 3], pytest.approx([0.935, 0.985, 0.980]))
    assert plots.learning_curve(sweep_report.trials[5]) == ("accuracy", [], [])


def test_wrong_digit_titles_most_confident_first(sweep_report: build.Report) -> None:
    pred = rundir.load_predictions(sweep_report.trials[1].run_dir)
    assert tables.wrong_digit_titles(pred) == [
        "true 4 / pred 9 (97.0%)",
        "true 7 / pred 2 (91.0%)",
        "true 4 / pred 9 (80.0%)",
        "true 3 / pred 5 (70.0%)",
        "true 4 / pred 9 (60.0%)",
        "true 7 / pred 2 (55.0%)",
    ]


# --- units -------------------------------------------------------------------------------


def test_confusion_matrix_counts() -> None:
    y_true = np.array([0, 0, 1, 2, 2, 2, 9], dtype=np.uint8)
    y_pred = np.array([0, 1, 1, 2, 9, 9, 9], dtype=np.uint8)
    expected = np.zeros((10, 10), dtype=int)
    expected[0, 0] = expected[0, 1] = expected[1, 1] = expected[2, 2] = expected[9, 9] = 1
    expected[2, 9] = 2
    np.testing.assert_array_equal(tables.confusion_matrix(y_true, y_pred), expected)
    with pytest.raises(ValueError, match="0..9"):
        tables.confusion_matrix(np.array([10]), np.array([0]))


def test_last_error_line_takes_the_last_traceback(tmp_path: Path) -> None:
    log = tmp_path / "x.err"
    log.write_text(
        "Traceback (most recent call last):\n  File \"a.py\", line 1\nKeyError: 'first'\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n  File \"b.py\", line 2\n    raise X\n"
        "RuntimeError: the real one\nsrun: error: node1: task 0: Exited with exit code 1\n"
    )
    assert trials_mod.last_error_line(log) == "RuntimeError: the real one"
    killed = "slurmstepd: error: *** JOB 7 ON node1 CANCELLED AT 2026-01-01T10:00:00 DUE TO TIME LIMIT ***"
    log.write_text(f"some output\n{killed}\n")
    assert trials_mod.last_error_line(log) == killed
    assert trials_mod.last_error_line(tmp_path / "missing.err") is None


# --- other layouts -----------------------------------------------------------------------


def test_without_validation_data_it_ranks_by_test_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    make_trial(sweep, 0, ["train.seed=1"], metrics=fake_metrics(test=0.97), started_epochs=3)
    make_trial(sweep, 1, ["train.seed=2"], metrics=fake_metrics(test=0.98), started_epochs=3)
    assert cli.main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "**Best trial: 1** (`train.seed=2`): test accuracy 0.9800; ranked by test_accuracy" in out
    assert "ranked by TEST accuracy because no finished trial has validation data" in out
    assert "not model selection" in out and "not model selection" in err
    assert [r["best"] for r in read_csv(tmp_path / "out" / "report.csv")] == ["", "yes"]
    # Learning curves fall back to training accuracy; no predictions, so no confusion matrix (and a note why).
    assert_png(tmp_path / "out" / "learning_curves.png")
    assert "no predictions.npz" in out and not (tmp_path / "out" / "confusion_matrix.png").exists()


def test_single_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A plain `mnist-hpc-train` run: Hydra's files and the run's outputs, no job.json.
    run = tmp_path / "runs" / "2026-01-01" / "10-00-00"
    (run / rundir.HYDRA_DIR).mkdir(parents=True)
    (run / rundir.HYDRA_OVERRIDES).write_text("- data.validation_split=0.1\n")
    fake_predictions(run, BEST_MISTAKES)
    write_json(run / rundir.METRICS_FILE, fake_metrics(test=0.975, best_val=0.985, final_val=0.980))
    assert cli.main([str(run)]) == 0
    out = capsys.readouterr().out
    rows = read_csv(run / "report" / "report.csv")
    assert [(r["state"], r["overrides"], r["test_accuracy"]) for r in rows] == [
        ("COMPLETED", "data.validation_split=0.1", "0.975")
    ]
    np.testing.assert_array_equal(markdown_matrix(out), BEST_MATRIX)
    assert "Best trial" not in out
    for name in ("learning_curves.png", "confusion_matrix.png", "wrong_digits.png"):
        assert_png(run / "report" / name)
    assert not list((run / "report").glob("metric_vs_*"))


def test_a_trial_directory_of_a_sweep_is_a_run(sweep_report: build.Report, tmp_path: Path) -> None:
    built = build.build_report(sweep_report.trials[1].run_dir, tmp_path / "one")
    assert [t.number for t in built.trials] == [1] and built.selection is None
    np.testing.assert_array_equal(markdown_matrix(built.markdown), BEST_MATRIX)


def test_optuna_sweep_without_job_files(tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    sweep.mkdir()
    (sweep / "optimization_results.yaml").write_text("name: optuna\nbest_params: {optimizer.learning_rate: 0.0031}\n")
    make_trial(sweep, 0, ["optimizer.learning_rate=0.0031"], with_job=False, metrics=fake_metrics(0.97, 0.98, 0.975))
    make_trial(sweep, 1, ["optimizer.learning_rate=0.0007"], with_job=False, metrics=fake_metrics(0.98, 0.96, 0.955))
    make_trial(sweep, 2, ["optimizer.learning_rate=0.02"], with_job=False, started_epochs=5)
    built = build.build_report(sweep)
    assert [(t.number, t.state) for t in built.trials] == [(0, "COMPLETED"), (1, "COMPLETED"), (2, "UNKNOWN")]
    assert built.selection is not None and built.selection.trial is built.trials[0]
    assert_png(built.out_dir / "metric_vs_optimizer.learning_rate.png")


def test_slurm_states_come_from_sacct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failed_logs: dict[str, str]) -> None:
    sweep = tmp_path / "sweep"
    states = ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "RUNNING", "PENDING"]
    cancelled = "slurmstepd: error: *** JOB 77_2 ON node1 CANCELLED AT 2026-01-01T10:00:00 ***"
    for num, state in enumerate(states):
        make_trial(
            sweep, num, [f"train.seed={num}"], cluster="slurm", job_id=f"77_{num}",
            metrics=fake_metrics(0.97, 0.98, 0.98) if state == "COMPLETED" else None,
            stderr={"FAILED": failed_logs["cache"], "CANCELLED": cancelled + "\n"}.get(state),
        )
    rows = {
        f"77_{n}": {"state": s, "elapsed": "00:01:00", "node": "node1", "exit_code": "0:0"} for n, s in enumerate(states)
    }
    asked: list[list[str]] = []
    # The controller no longer lists them (they left the queue): accounting has every state.
    monkeypatch.setattr(slurm, "query_squeue", lambda ids: {})
    monkeypatch.setattr(slurm, "query_sacct", lambda ids: asked.append(sorted(ids)) or slurm.Accounting(rows))
    trials, notes = trials_mod.read_trials(trials_mod.find_runs(sweep)[1])
    assert asked == [[f"77_{n}" for n in range(6)]] and notes == []
    assert [t.state for t in trials] == states
    assert [t.error for t in trials] == [None, ERROR_LINE, cancelled, None, None, None]
    table = tables.markdown_table(trials)
    assert "| 3 | 77_3 | TIMEOUT | train.seed=3 | - | - | - | - | 00:01:00 (elapsed) |" in table


def test_packed_trials_get_their_own_state_and_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failed_logs: dict[str, str]
) -> None:
    # Three trials in one Slurm task (trials_per_task=3): the task FAILED because trial 1 raised.
    sweep = tmp_path / "sweep"
    shared_log = failed_logs["packed"]
    own_exc = ValueError("learning rate too large for this demo")
    own_error = "ValueError: learning rate too large for this demo"
    for num in range(3):
        make_trial(
            sweep, num, [f"train.seed={num}"], cluster="slurm", job_id="88_0", packed_slot=num, stderr=shared_log,
            metrics=None if num == 1 else fake_metrics(0.97, 0.98, 0.98), failure=own_exc if num == 1 else None,
        )
    row = {"state": "FAILED", "elapsed": "00:03:00", "node": "node1", "exit_code": "1:0"}
    monkeypatch.setattr(slurm, "query_squeue", lambda ids: {})
    monkeypatch.setattr(slurm, "query_sacct", lambda ids: slurm.Accounting({"88_0": row}))
    trials, _ = trials_mod.read_trials(trials_mod.find_runs(sweep)[1])
    assert [(t.state, t.error) for t in trials] == [("COMPLETED", None), ("FAILED", own_error), ("COMPLETED", None)]


def test_failure_file_is_preferred_to_the_log(tmp_path: Path, failed_logs: dict[str, str]) -> None:
    sweep = tmp_path / "sweep"
    make_trial(sweep, 0, ["train.seed=0"], stderr=failed_logs["cache"], ended=True, failure=KeyError("from failure.json"))
    make_trial(sweep, 1, ["train.seed=1"], stderr="no traceback here\n", ended=True)
    trials, _ = trials_mod.read_trials(trials_mod.find_runs(sweep)[1])
    assert [t.state for t in trials] == ["FAILED", "FAILED"]
    assert trials[0].error == "KeyError: 'from failure.json'"
    assert trials[1].error == f"no error line found; see {sweep / '.submitit' / '1001' / '1001_0_log.err'}"


@pytest.mark.parametrize("layout", ["empty", "unnumbered", "missing"])
def test_no_trials_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str) -> None:
    target = tmp_path / "target"
    if layout != "missing":
        target.mkdir()
    if layout == "unnumbered":
        (target / "notes").mkdir()
        (target / "7").mkdir()  # numbered, but nothing says it is a trial
    assert cli.main([str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mnist-hpc-report: error: ") and str(target) in err
    assert ("not a directory" if layout == "missing" else "holds no trials") in err
    assert not (target / "report").exists()


def test_report_imports_no_tensorflow(sweep_report: build.Report, tmp_path: Path) -> None:
    sweep = sweep_report.trials[0].run_dir.parent
    marker = tmp_path / "modules.json"
    code = (
        "import atexit, json, sys\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write(json.dumps(["
        "'tensorflow' in sys.modules, 'keras' in sys.modules, 'matplotlib' in sys.modules])))\n"
        "from mnist_hpc.cli import report_main\n"
        "report_main(sys.argv[1:])\n"
    )
    for args, plots in ((["--help"], False), ([str(sweep), "--out", str(tmp_path / "out")], True)):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert proc.returncode == 0, proc.stderr
        tensorflow, keras, matplotlib = json.loads(marker.read_text())
        assert not tensorflow and not keras
        assert matplotlib is plots  # --help stays fast: no matplotlib
        if not plots:
            assert "usage: mnist-hpc-report" in proc.stdout
    assert "**Best trial: 1**" in proc.stdout
    assert_png(tmp_path / "out" / "wrong_digits.png")


def test_sacct_row_of_pending_array_tasks_is_expanded():
    from mnist_hpc.slurm import expand_array_id

    assert expand_array_id("123_[0-2,5%2]") == ["123_0", "123_1", "123_2", "123_5"]
    assert expand_array_id("123_4") == ["123_4"]
    assert expand_array_id("123") == ["123"]


def test_unchanged_plots_are_not_redrawn_and_changed_ones_are(tmp_path: Path, failed_logs: dict[str, str]) -> None:
    sweep = build_sweep(tmp_path / "sweep", failed_logs["cache"])
    first = build.build_report(sweep)
    pngs = {p.name for p in (sweep / "report").glob("*.png")}
    assert set(first.drawn) == pngs and len(pngs) == 5
    assert build.build_report(sweep).drawn == []  # nothing redrawn

    # Trial 4 finishes an epoch: the curves and per-parameter plots change, the best trial's do not.
    progress = rundir.read_progress(sweep / "4")
    rundir.write_progress(sweep / "4", 3, 5, progress.history + [epoch_record(3, 0.92, 0.95)])
    rebuilt = build.build_report(sweep)
    assert sorted(rebuilt.drawn) == [
        "learning_curves.png", "metric_vs_optimizer.learning_rate.png", "metric_vs_optimizer.png"
    ]
    assert [t.epochs_done for t in rebuilt.trials if t.number == 4] == [3]
    assert_png(sweep / "report" / "learning_curves.png")

    # The best trial's predictions are rewritten with other content: its two plots are redrawn,
    # whatever the file's size or time stamp.
    fake_predictions(sweep / "1", {**BEST_MISTAKES, 90: (8, 0.75)})
    assert sorted(build.build_report(sweep).drawn) == ["confusion_matrix.png", "wrong_digits.png"]


def one_epoch_sweep(sweep: Path, learning_rates: list[str]) -> list:
    """A sweep of one-epoch trials over ``learning_rates``, as read for the report."""
    sweep.mkdir(parents=True)
    for num, lr in enumerate(learning_rates):
        metrics = fake_metrics(0.97, 0.96 - num / 100, 0.96 - num / 100)
        metrics["history"] = [epoch_record(1, 0.9, 0.96 - num / 100)]
        make_trial(sweep, num, [f"optimizer.learning_rate={lr}"], metrics=metrics, started_epochs=1)
    return trials_mod.read_trials(trials_mod.find_runs(sweep)[1])[0]


def test_learning_curves_of_a_one_epoch_sweep_have_whole_epochs_only(tmp_path: Path) -> None:
    trials = one_epoch_sweep(tmp_path / "sweep", ["1e-4", "3e-4", "1e-3"])
    ax = plots.learning_curves_figure(trials).axes[0]
    assert list(ax.get_xticks()) == [1.0]
    lo, hi = ax.get_xlim()
    assert lo < 1 < hi and hi - lo == pytest.approx(1.0)


@pytest.mark.parametrize("rates, scale", [(["1e-4", "3e-4", "1e-3"], "log"), (["3e-4", "1e-3", "1e-2"], "log"),
                                          (["3e-4", "1e-3"], "linear"), (["0.1", "0.2", "0.5"], "linear")])
def test_a_hyperparameter_spanning_a_decade_is_drawn_on_a_log_axis(tmp_path: Path, rates: list[str], scale: str) -> None:
    trials = one_epoch_sweep(tmp_path / "sweep", rates)
    values = ranking.swept_params(trials)["optimizer.learning_rate"]
    ax = plots.metric_vs_param_figure(trials, "optimizer.learning_rate", values, "val_accuracy").axes[0]
    assert ax.get_xscale() == scale


def test_trials_with_the_same_overrides_but_other_data_are_shown_as_different_configs(tmp_path: Path) -> None:
    """The identity (identity.json) tells apart what no override shows: here the data's sha256
    (``MNIST_HPC_CACHE`` pointed elsewhere for trial 1). A queued trial, with no identity yet, is no
    reason to show every identity key."""
    sweep = tmp_path / "sweep"
    shas = ["a" * 64, "b" * 64]
    for num in (0, 1, 2):
        make_trial(sweep, num, ["train.seed=0"], metrics=fake_metrics(0.97, 0.96, 0.96) if num < 2 else None)
        if num < 2:
            rundir.write_identity(sweep / str(num), {"data.sha256": shas[num], "train.seed": 0, "model.hidden_units": 512},
                                  fingerprint="f" * 16 + str(num))
    trials = trials_mod.read_trials(trials_mod.find_runs(sweep)[1])[0]
    swept = ranking.swept_params(trials)
    assert swept == {"data.sha256": [shas[0], shas[1], None]}
    table = tables.markdown_table(trials)
    assert "data.sha256=aaaaaaaaaaaa…" in table and "data.sha256=bbbbbbbbbbbb…" in table, table
    rows = tables.table_rows(trials)
    assert [r["data.sha256"] for r in rows] == [shas[0], shas[1], ""]


def test_an_identity_is_not_the_trials_when_its_job_was_queued_for_another_config(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_trial(sweep, 0, ["train.seed=0"], metrics=fake_metrics(0.97, 0.96, 0.96))
    job = rundir.read_job(sweep / "0")
    for bound, shown in (("1" * 16, {"data.sha256": "a" * 64}), ("0" * 16, None)):
        rundir.write_job(sweep / "0", dataclasses.replace(job, fingerprint="1" * 16))
        rundir.write_identity(sweep / "0", {"data.sha256": "a" * 64}, fingerprint=bound)
        [trial] = trials_mod.read_trials([sweep / "0"])[0]
        assert trial.files.identity == shown, bound
        assert (trial.files.metrics is not None) == (shown is not None)
