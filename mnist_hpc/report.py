"""``mnist-hpc-report``: one table and a few plots for a sweep (or a single run) directory.

Reads what the runs left on disk (``job.json``, ``.hydra/overrides.yaml``, ``metrics.json``,
``train.log``, ``predictions.npz``, the submitit logs) and the job states that
:mod:`mnist_hpc.status` gets from Slurm. A sweep that is still running is normal: missing files
mean "not there yet", and every trial is listed whatever its state.

Login-node code: numpy and matplotlib (imported inside the plotting functions, so ``--help``
stays fast), never TensorFlow.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from mnist_hpc import status
from mnist_hpc.io import atomic_path, write_text_atomic
from mnist_hpc.outputs import CONFIG_FILE, FAILURE_FILE, JOB_FILE, METRICS_FILE, PREDICTIONS_FILE

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

# Hydra writes a job's overrides here; trials of sweeps launched without our launcher have no job.json.
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
# The job log: hydra.job.name is "train" (conf/config.yaml).
LOG_FILE = "train.log"
REPORT_DIR = "report"
CSV_FILE = "report.csv"
MARKDOWN_FILE = "report.md"
LEARNING_CURVES_PNG = "learning_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
WRONG_DIGITS_PNG = "wrong_digits.png"
N_CLASSES = 10
METRICS = ("val_accuracy", "test_accuracy")
# One epoch line of train.log: "epoch 2/5 accuracy=0.9689 loss=0.1058 ... seconds=2.85".
EPOCH_RECORD = re.compile(r"epoch (\d+)/(\d+)((?:[ \t]+[A-Za-z_]+=[^\s=]+)*)")
TRACEBACK_START = "Traceback (most recent call last):"
# What Slurm writes into a job's stderr when it cancels or kills it (time limit, memory, scancel).
SLURM_ERROR = "slurmstepd: error:"
# Only the end of a job log is read: the traceback that ended the job is there, and logs can be long.
LOG_TAIL_BYTES = 256 * 1024
# Numeric hyperparameters spanning more than this factor get a logarithmic axis.
LOG_AXIS_SPAN = 10.0
# More trials than this and the learning-curve legend would hide the curves.
MAX_LEGEND_ENTRIES = 12
DPI = 110


class ReportError(RuntimeError):
    """The target is neither a sweep directory with trials nor a run directory."""


@dataclass
class Trial:
    """One trial (run directory) as the report shows it; ``None`` means "not known (yet)"."""

    number: Optional[int]
    run_dir: Path
    overrides: list[str] = field(default_factory=list)
    job_id: str = ""
    state: str = "UNKNOWN"
    elapsed: str = ""
    epochs_done: Optional[int] = None
    epochs_planned: Optional[int] = None
    # metrics.json exists: the run finished (it is written last).
    finished: bool = False
    # From metrics.json only (finished runs); val_accuracy is the last epoch's, best_ the highest.
    best_val_accuracy: Optional[float] = None
    val_accuracy: Optional[float] = None
    test_accuracy: Optional[float] = None
    wall_time_s: Optional[float] = None
    # Per-epoch records: from metrics.json when finished, else parsed from train.log.
    history: list[dict[str, float]] = field(default_factory=list)
    # The submitit stderr log (job.json) and, for an unfinished run, its error line (failure.json or the log).
    stderr: Optional[str] = None
    error: Optional[str] = None

    @property
    def label(self) -> str:
        return f"trial {self.number}" if self.number is not None else f"run {self.run_dir.name}"


@dataclass
class Selection:
    """The best trial, the metric it was ranked by, and what the reader must know about that."""

    # None while no finished trial has the metric.
    trial: Optional[Trial]
    # The metric actually used: test_accuracy when val_accuracy was asked for but no trial has it.
    metric: str
    # How many trials were compared (finished, with the metric).
    ranked: int
    # Which trials were left out of the ranking, and why.
    note: str = ""
    # Set when trials were ranked by test accuracy, which is not model selection.
    warning: str = ""


@dataclass
class Predictions:
    """The test-set predictions a run saved (see :func:`mnist_hpc.outputs.write_predictions`)."""

    y_true: np.ndarray
    y_pred: np.ndarray
    y_prob: np.ndarray
    wrong_index: np.ndarray
    wrong_images: np.ndarray


@dataclass
class Report:
    """What :func:`build_report` made: the markdown text and the files written."""

    markdown: str
    out_dir: Path
    files: list[Path]
    trials: list[Trial]
    selection: Optional[Selection]


# --- finding and reading trials -------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is one run's directory (submitted, or a plain Hydra run)."""
    markers = (JOB_FILE, METRICS_FILE, str(HYDRA_OVERRIDES), CONFIG_FILE, LOG_FILE)
    return any((path / marker).is_file() for marker in markers)


def trial_dirs(sweep_dir: Path) -> list[Path]:
    """The numbered trial directories of a sweep (basic or Optuna sweeper), in trial order."""
    found = [
        p
        for p in sweep_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and ((p / JOB_FILE).is_file() or (p / HYDRA_OVERRIDES).is_file())
    ]
    return sorted(found, key=lambda p: int(p.name))


def find_runs(target: Path) -> tuple[bool, list[Path]]:
    """Whether ``target`` is a sweep, and its run directories (the target itself for a run).

    Raises:
        ReportError: ``target`` holds neither numbered trials nor a run.
    """
    if not target.is_dir():
        raise ReportError(f"{target} is not a directory; pass a sweep directory or a run directory")
    if is_run_dir(target):
        return False, [target]
    trials = trial_dirs(target)
    if not trials:
        raise ReportError(
            f"{target} holds no trials (numbered directories with {JOB_FILE} or {HYDRA_OVERRIDES}) and is not a "
            f"run directory (no {JOB_FILE}, {METRICS_FILE} or {HYDRA_OVERRIDES}); pass a sweep directory such as "
            "$SCRATCH/mnist-hpc/sweeps/<date>/<time> or one of its numbered trial directories"
        )
    return True, trials


def read_json(path: Path) -> Optional[dict[str, Any]]:
    """A JSON object from disk, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_yaml(path: Path) -> Any:
    """A YAML document from disk, or None when it is missing or unreadable."""
    import yaml  # PyYAML comes with omegaconf

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def hydra_overrides(run_dir: Path) -> list[str]:
    """The overrides Hydra recorded for a run (``.hydra/overrides.yaml``), or [] if none."""
    data = read_yaml(run_dir / HYDRA_OVERRIDES)
    return [str(item) for item in data] if isinstance(data, list) else []


def planned_epochs(run_dir: Path) -> Optional[int]:
    """``train.epochs`` of the resolved config a job writes at its start, if it has started."""
    cfg = read_yaml(run_dir / CONFIG_FILE)
    try:
        return int(cfg["train"]["epochs"])
    except (TypeError, KeyError, ValueError):
        return None


def parse_log_history(log: Path) -> list[dict[str, float]]:
    """Per-epoch records from the epoch lines of a ``train.log``; a resumed epoch keeps its last line."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    records: dict[int, dict[str, float]] = {}
    for match in EPOCH_RECORD.finditer(text):
        record: dict[str, float] = {"epoch": int(match.group(1))}
        for pair in match.group(3).split():
            key, _, value = pair.partition("=")
            try:
                record[key] = float(value)
            except ValueError:
                continue
        records[record["epoch"]] = record
    return [records[epoch] for epoch in sorted(records)]


def _read_tail(path: Path, n_bytes: int = LOG_TAIL_BYTES) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - n_bytes))
        return fh.read().decode("utf-8", errors="replace")


def last_error_line(log: Path) -> Optional[str]:
    """The exception line that ended a job: the last line of the last traceback in its log.

    Lines after the traceback (submitit's "Submitted job triggered an exception", srun's exit
    notice) are skipped. Without a traceback, Slurm's own last ``slurmstepd: error:`` line
    (time limit, out of memory, cancelled) is the best explanation there is.
    """
    try:
        lines = _read_tail(log).splitlines()
    except OSError:
        return None
    starts = [i for i, line in enumerate(lines) if line.startswith(TRACEBACK_START)]
    if starts:
        for line in lines[starts[-1] + 1 :]:
            # Frames and source lines are indented; the exception line is the first that is not.
            if line.strip() and not line[0].isspace():
                return line.strip()
    for line in reversed(lines):
        if SLURM_ERROR in line:
            return line.strip()
    return None


def job_status(run_dir: Path) -> tuple[status.JobStatus, Optional[str]]:
    """The run's job as :mod:`mnist_hpc.status` sees it, and a note when ``job.json`` is unusable.

    A run without ``job.json`` (a plain Hydra run, or an in-process sweep) has no job to ask
    Slurm about; its state then comes from its files only.
    """
    note = None
    if (run_dir / JOB_FILE).is_file():
        try:
            return status.collect(str(run_dir))[0], None
        except (ValueError, KeyError, OSError, status.StatusError) as exc:
            note = f"{run_dir / JOB_FILE} is unreadable ({exc}); its state comes from the files only"
    done, planned = status.last_epoch(run_dir)
    job = status.JobStatus(
        job_id="-",
        run_dir=str(run_dir),
        overrides=hydra_overrides(run_dir),
        last_epoch=done,
        epochs=planned,
        source="files",
    )
    return job, note


def read_trial(run_dir: Path, job: status.JobStatus) -> Trial:
    """Everything the report shows about one run, from its job status and its files."""
    info = read_json(run_dir / JOB_FILE) or {}
    number = info.get("trial")
    if number is None and run_dir.name.isdigit():
        number = int(run_dir.name)
    trial = Trial(
        number=int(number) if number is not None else None,
        run_dir=run_dir,
        overrides=list(job.overrides) or hydra_overrides(run_dir),
        job_id=job.job_id,
        state=job.state,
        elapsed=job.elapsed,
        epochs_done=job.last_epoch,
        epochs_planned=job.epochs,
        stderr=info.get("stderr"),
    )
    metrics = read_json(run_dir / METRICS_FILE)
    if metrics is not None:
        trial.finished = True
        trial.best_val_accuracy = _float(metrics.get("best_val_accuracy"))
        trial.val_accuracy = _float(metrics.get("val_accuracy"))
        trial.test_accuracy = _float(metrics.get("test_accuracy"))
        trial.wall_time_s = _float(metrics.get("wall_time_s"))
        trial.history = [dict(r) for r in metrics.get("history", []) if isinstance(r, dict)]
    else:
        trial.history = parse_log_history(run_dir / LOG_FILE)
        if trial.epochs_done is None and (epochs := planned_epochs(run_dir)) is not None:
            trial.epochs_done, trial.epochs_planned = 0, epochs
    failure = read_json(run_dir / FAILURE_FILE)
    packed = info.get("packed_slot") is not None
    if packed:
        # Several trials ran in one Slurm task: sacct's state is the task's; the trial's files are its own.
        trial.state = "COMPLETED" if trial.finished else ("FAILED" if failure else trial.state)
    if not trial.finished:
        trial.error = trial_error(failure, trial.stderr, shared_log=packed, failed=trial.state == "FAILED")
    return trial


def trial_error(
    failure: Optional[dict[str, Any]], stderr: Optional[str], shared_log: bool, failed: bool
) -> Optional[str]:
    """The error line of an unfinished trial: its ``failure.json``, else the end of its own job log.

    A log shared by the trials of a packed task may end with another trial's traceback, so it is
    only pointed to, not quoted.
    """
    if failure and failure.get("error"):
        return str(failure["error"])
    if stderr and not shared_log:
        if (line := last_error_line(Path(stderr))) is not None:
            return line
    if failed and stderr:
        return f"no error line found; see {stderr}" + (" (shared by the trials of this task)" if shared_log else "")
    return None


def _float(value: Any) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def collect_trials(run_dirs: Sequence[Path]) -> tuple[list[Trial], list[str]]:
    """Read every run and fill in its state (``sacct``, else ``squeue``, else the files).

    Returns:
        The trials in the order given, and notes about how states were obtained.
    """
    notes: list[str] = []
    jobs: list[status.JobStatus] = []
    for run_dir in run_dirs:
        job, note = job_status(run_dir)
        jobs.append(job)
        notes += [note] if note else []
    filled, state_notes = status.fill_states(jobs)
    by_dir = {job.run_dir: job for job in filled}
    trials = [read_trial(run_dir, by_dir[str(run_dir)]) for run_dir in run_dirs]
    return trials, notes + state_notes


# --- hyperparameters and ranking ---------------------------------------------------------


def parse_override(override: str) -> tuple[str, Optional[str]]:
    """``optimizer.learning_rate=1e-3`` -> (``optimizer.learning_rate``, ``1e-3``); ``+``/``~`` prefixes dropped."""
    key, sep, value = override.partition("=")
    return key.lstrip("+~"), (value if sep else None)


def trial_params(trial: Trial) -> dict[str, Optional[str]]:
    return dict(parse_override(o) for o in trial.overrides)


def swept_params(trials: Sequence[Trial]) -> dict[str, list[Optional[str]]]:
    """The override keys whose values differ between trials, with each trial's value (None: not set)."""
    params = [trial_params(t) for t in trials]
    keys: list[str] = []
    for p in params:
        keys += [k for k in p if k not in keys]
    values = {k: [p.get(k) for p in params] for k in keys}
    return {k: v for k, v in values.items() if len(set(v)) > 1}


def shared_overrides(trials: Sequence[Trial]) -> list[str]:
    """Overrides every trial has with the same value (paths and the like), in the order given."""
    if not trials:
        return []
    swept = swept_params(trials)
    return [o for o in trials[0].overrides if parse_override(o)[0] not in swept]


def metric_value(trial: Trial, metric: str) -> Optional[float]:
    """The value a trial is ranked by: ``val_accuracy`` means its best epoch's validation accuracy."""
    if metric == "val_accuracy":
        return trial.best_val_accuracy
    if metric == "test_accuracy":
        return trial.test_accuracy
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


TEST_SELECTION_WARNING = (
    "ranked by TEST accuracy{why}. Choosing a model by its test accuracy is not model selection: the "
    "test set then no longer gives an unbiased estimate of the chosen model. {fix}"
)


def best_trial(trials: Sequence[Trial], metric: str = "val_accuracy") -> Selection:
    """The finished trial with the highest ``metric`` (ties: the lowest trial number).

    ``val_accuracy`` ranks by ``best_val_accuracy``. Only when no finished trial has validation
    data does it fall back to test accuracy, and the returned warning says so.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    finished = [t for t in trials if t.finished]
    warning = ""
    if metric == "val_accuracy" and not any(t.best_val_accuracy is not None for t in finished):
        if any(t.test_accuracy is not None for t in finished):
            metric = "test_accuracy"
            warning = TEST_SELECTION_WARNING.format(
                why=" because no finished trial has validation data",
                fix="Hold out validation data (e.g. data.validation_split=0.1) to select on it.",
            )
    elif metric == "test_accuracy":
        warning = TEST_SELECTION_WARNING.format(
            why=" as asked (--metric test_accuracy)", fix="Rank by val_accuracy (the default) to select a model."
        )
    ranked = [t for t in finished if metric_value(t, metric) is not None]
    notes = []
    if unfinished := len(trials) - len(finished):
        notes.append(f"{unfinished} unfinished trial(s) not ranked")
    if without := len(finished) - len(ranked):
        notes.append(f"{without} finished trial(s) without {metric} not ranked")
    best = max(ranked, key=lambda t: metric_value(t, metric), default=None)  # type: ignore[arg-type,return-value]
    return Selection(trial=best, metric=metric, ranked=len(ranked), note="; ".join(notes), warning=warning)


# --- tables ----------------------------------------------------------------------------


def epochs_cell(trial: Trial) -> str:
    """``3/5`` (done/planned), ``3`` when the plan is unknown, ``-`` before the first epoch is known."""
    if trial.epochs_done is None:
        return "-"
    return f"{trial.epochs_done}/{trial.epochs_planned}" if trial.epochs_planned else str(trial.epochs_done)


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def table_rows(trials: Sequence[Trial], best: Optional[Trial] = None) -> list[dict[str, Any]]:
    """One flat row per trial (the CSV's content): every override, plus one column per swept parameter."""
    swept = swept_params(trials)
    rows = []
    for i, t in enumerate(trials):
        row: dict[str, Any] = {
            "trial": "" if t.number is None else t.number,
            "job_id": t.job_id,
            "state": t.state,
            "best": "yes" if best is t else "",
            "overrides": " ".join(t.overrides),
        }
        row.update({key: "" if values[i] is None else values[i] for key, values in swept.items()})
        row.update(
            {
                "epochs_done": "" if t.epochs_done is None else t.epochs_done,
                "epochs_planned": "" if t.epochs_planned is None else t.epochs_planned,
                "best_val_accuracy": "" if t.best_val_accuracy is None else t.best_val_accuracy,
                "final_val_accuracy": "" if t.val_accuracy is None else t.val_accuracy,
                "test_accuracy": "" if t.test_accuracy is None else t.test_accuracy,
                "wall_time_s": "" if t.wall_time_s is None else round(t.wall_time_s, 3),
                "elapsed": t.elapsed,
                "error": t.error or "",
                "run_dir": str(t.run_dir),
            }
        )
        rows.append(row)
    return rows


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ") or "-"


def markdown_grid(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown pipe table."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(trials: Sequence[Trial], best: Optional[Trial] = None) -> str:
    """The trial table: overrides shown are those that differ between trials (shared ones are listed once)."""
    swept = swept_params(trials) if len(trials) > 1 else None
    header = [
        "trial", "job", "state", "overrides", "epochs", "best val acc", "final val acc", "test acc", "wall time", "error"
    ]
    rows = []
    for t in trials:
        overrides = [o for o in t.overrides if swept is None or parse_override(o)[0] in swept]
        if t.wall_time_s is not None:
            wall = format_duration(t.wall_time_s)
        else:
            wall = f"{t.elapsed} (elapsed)" if t.elapsed else "-"
        number = "-" if t.number is None else str(t.number)
        rows.append(
            [
                f"**{number}**" if t is best else number,
                t.job_id,
                t.state,
                " ".join(overrides),
                epochs_cell(t),
                _fmt(t.best_val_accuracy),
                _fmt(t.val_accuracy),
                _fmt(t.test_accuracy),
                wall,
                t.error or "",
            ]
        )
    return markdown_grid(header, rows)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """Counts of (true, predicted) label pairs: rows are true digits, columns predicted ones."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred {y_pred.size}")
    if y_true.size and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def confusion_markdown(matrix: np.ndarray) -> str:
    n = matrix.shape[0]
    rows = [[f"**{i}**", *(int(c) for c in matrix[i])] for i in range(n)]
    return markdown_grid(["true \\ pred", *range(n)], rows)


def top_confusions(matrix: np.ndarray, k: int = 3) -> list[tuple[int, int, int]]:
    """The ``k`` most frequent mistakes as (true, predicted, count), most frequent first."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    pairs = [(int(t), int(p), int(off[t, p])) for t, p in zip(*np.nonzero(off))]
    return sorted(pairs, key=lambda x: (-x[2], x[0], x[1]))[:k]


def load_predictions(run_dir: Path) -> Predictions:
    """A run's ``predictions.npz``.

    Raises:
        FileNotFoundError: the run has not written it (still running, failed, or older code).
        ValueError: the file is unreadable or lacks an array.
    """
    path = run_dir / PREDICTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {PREDICTIONS_FILE} in {run_dir}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return Predictions(**{name: data[name] for name in Predictions.__dataclass_fields__})
    except (KeyError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def wrong_digit_titles(pred: Predictions) -> list[str]:
    """``true T / pred P (conf%)`` for each kept wrong digit, in the stored order (most confident first)."""
    titles = []
    for index in pred.wrong_index:
        true, guess = int(pred.y_true[index]), int(pred.y_pred[index])
        conf = 100 * float(pred.y_prob[index, guess])
        # A wrong answer given with 99.97% must not read as "100.0%".
        titles.append(f"true {true} / pred {guess} ({f'{conf:.1f}%' if conf < 99.95 else '>99.9%'})")
    return titles


# --- plots -----------------------------------------------------------------------------


def _figure(width: float, height: float, layout: Optional[str] = "constrained") -> "Figure":
    # A bare Figure on the Agg canvas: no pyplot global state and no GUI backend on a login node.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: "Figure", path: Path) -> Path:
    """Render ``fig`` to ``path`` atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def learning_curve(trial: Trial) -> tuple[str, list[int], list[float]]:
    """The metric a trial's curve shows (val_accuracy if it has one, else accuracy), epochs and values."""
    name = "val_accuracy" if any("val_accuracy" in r for r in trial.history) else "accuracy"
    points = [(int(r["epoch"]), float(r[name])) for r in trial.history if name in r and "epoch" in r]
    return name, [e for e, _ in points], [v for _, v in points]


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_learning_curves(trials: Sequence[Trial], path: Path, best: Optional[Trial] = None) -> Path:
    """Every trial's per-epoch accuracy: validation (solid) where held out, else training (dashed)."""
    import matplotlib

    fig = _figure(8, 5)
    ax = fig.add_subplot()
    swept = swept_params(trials)
    curves = [(t, *learning_curve(t)) for t in trials]
    curves = [c for c in curves if c[2]]
    cmap = matplotlib.colormaps["tab10" if len(curves) <= 10 else "viridis"]
    for i, (t, name, epochs, values) in enumerate(curves):
        colour = cmap(i if len(curves) <= 10 else i / max(1, len(curves) - 1))
        # Values with the last part of their key: "learning_rate=0.001" fits a legend, the full key may not.
        params = " ".join(
            f"{key.rsplit('.', 1)[-1]}={value}" for key, value in trial_params(t).items() if key in swept
        )
        label = _short(f"{t.number if t.number is not None else t.run_dir.name}: {params}".rstrip(": "), 60)
        if t is best:
            label += " (best)"
        ax.plot(
            epochs,
            values,
            linestyle="-" if name == "val_accuracy" else "--",
            marker="o",
            markersize=3,
            linewidth=2.8 if t is best else 1.3,
            color=colour,
            label=label,
        )
    if not curves:
        ax.text(0.5, 0.5, "no epoch logged yet", ha="center", va="center", transform=ax.transAxes)
    elif len(curves) <= MAX_LEGEND_ENTRIES:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    styles = {
        "val_accuracy": "solid: validation accuracy",
        "accuracy": "dashed: training accuracy (no validation data)",
    }
    used = [text for name, text in styles.items() if any(c[1] == name for c in curves)]
    ax.set_title("Learning curves" + (f" ({'; '.join(used)})" if used else ""), fontsize=9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def numeric_values(values: Sequence[Optional[str]]) -> Optional[list[float]]:
    """The values as floats if every one is set and numeric, else None (plot as categories)."""
    try:
        numbers = [float(v) for v in values]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(x) for x in numbers) else None


def param_filename(key: str) -> str:
    return "metric_vs_" + re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"


def plot_metric_vs_param(
    trials: Sequence[Trial],
    key: str,
    values: Sequence[Optional[str]],
    metric: str,
    path: Path,
    best: Optional[Trial] = None,
) -> Path:
    """The ranking metric of each finished trial against one swept hyperparameter.

    Numeric values spanning more than ``LOG_AXIS_SPAN`` get a log axis; other values (lists,
    names, or a parameter some trials leave at its default) are categories.
    """
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    numbers = numeric_values(values)
    shown = [(t, v, i) for i, (t, v) in enumerate(zip(trials, values)) if metric_value(t, metric) is not None]
    if numbers is not None:
        xs = [numbers[i] for _, _, i in shown]
        if min(numbers) > 0 and max(numbers) / min(numbers) > LOG_AXIS_SPAN:
            ax.set_xscale("log")
    else:
        categories = list(dict.fromkeys("(default)" if v is None else v for v in values))
        if (nums := numeric_values([c for c in categories])) is not None:
            categories = [c for _, c in sorted(zip(nums, categories))]
        slot: Counter[str] = Counter()
        per_cat = Counter("(default)" if v is None else v for _, v, _ in shown)
        xs = []
        for _, v, _ in shown:
            cat = "(default)" if v is None else v
            # Spread trials that share a category so their points do not hide each other.
            offset = (slot[cat] - (per_cat[cat] - 1) / 2) * min(0.1, 0.6 / per_cat[cat])
            slot[cat] += 1
            xs.append(categories.index(cat) + offset)
        ax.set_xticks(range(len(categories)), [_short(c, 20) for c in categories], fontsize=8)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    ys = [metric_value(t, metric) for t, _, _ in shown]
    ax.scatter(xs, ys, s=30, color="tab:blue", zorder=2)
    for x, y, (t, _, _) in zip(xs, ys, shown):
        if t is best:
            ax.scatter([x], [y], s=220, marker="*", color="tab:red", zorder=3, label=f"best: {t.label}")
        if len(shown) <= 30:
            ax.annotate(str(t.number), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if not shown:
        ax.text(0.5, 0.5, f"no finished trial with {metric} yet", ha="center", va="center", transform=ax.transAxes)
    elif best is not None and any(t is best for t, _, _ in shown):
        ax.legend(fontsize=8)
    ax.set_xlabel(key)
    ax.set_ylabel("best val_accuracy" if metric == "val_accuracy" else metric)
    ax.set_title(f"{metric} vs {key} ({len(shown)} finished trials; numbers are trials)", fontsize=9)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, path: Path, title: str) -> Path:
    """The matrix with its counts written in every cell; colour on a log scale so mistakes show."""
    n = matrix.shape[0]
    fig = _figure(6.2, 5.6)
    ax = fig.add_subplot()
    shade = np.log1p(matrix.astype(float))
    ax.imshow(shade, cmap="Blues")
    threshold = shade.max() / 2 if shade.max() > 0 else 1.0
    for i in range(n):
        for j in range(n):
            ax.text(
                j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                color="white" if shade[i, j] > threshold else "black",
            )
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(title, fontsize=9)
    return save_png(fig, path)


def plot_wrong_digits(pred: Predictions, path: Path, title: str, columns: int = 8) -> Path:
    """The most confidently wrong test digits, each titled ``true T / pred P (conf%)``.

    Drawn as one mosaic image with a caption per tile rather than one axes per digit: 64 axes
    under a layout engine cost seconds, and this is a login-node command.
    """
    import numpy as np

    titles = wrong_digit_titles(pred)
    columns = max(1, min(columns, len(titles)))
    rows = max(1, math.ceil(len(titles) / columns))
    cell_w, cell_h = 28 + 4, 28 + 14  # pixels per tile: the digit plus room for its caption
    fig = _figure(max(columns * 1.45, 4.5), rows * 1.55 + 0.4, layout=None)
    fig.suptitle(title, fontsize=10)
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.90))
    ax.axis("off")
    if not titles:
        ax.text(0.5, 0.5, "no test digit was misclassified", ha="center", va="center", transform=ax.transAxes)
        return save_png(fig, path)
    mosaic = np.zeros((rows * cell_h, columns * cell_w), dtype=np.uint8)
    for k, image in enumerate(pred.wrong_images[: len(titles)]):
        r, c = divmod(k, columns)
        top, left = r * cell_h + 12, c * cell_w + 2
        mosaic[top : top + 28, left : left + 28] = image
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest", aspect="auto")
    for k, text in enumerate(titles):
        r, c = divmod(k, columns)
        ax.text(c * cell_w + cell_w / 2, r * cell_h + 6, text, ha="center", va="center", fontsize=6.5)
    return save_png(fig, path)


# --- the report ------------------------------------------------------------------------


def _state_counts(trials: Sequence[Trial]) -> str:
    counts = Counter(t.state for t in trials)
    return ", ".join(f"{n} {state}" for state, n in counts.most_common())


def selection_text(sel: Selection, trials: Sequence[Trial]) -> str:
    """The paragraph that names the best trial (by the overrides that set it apart) and how it was chosen."""
    if sel.trial is None:
        text = f"No finished trial has {sel.metric} yet, so there is no best trial."
    else:
        t = sel.trial
        params = " ".join(t.overrides)
        if len(trials) > 1:
            swept = swept_params(trials)
            params = " ".join(o for o in t.overrides if parse_override(o)[0] in swept) or params
        if sel.metric == "val_accuracy":
            score = (
                f"best validation accuracy {_fmt(t.best_val_accuracy)} "
                f"(final {_fmt(t.val_accuracy)}, test {_fmt(t.test_accuracy)})"
            )
            how = "ranked by best_val_accuracy"
        else:
            score = f"test accuracy {_fmt(t.test_accuracy)}"
            how = "ranked by test_accuracy"
        text = f"**Best trial: {t.number}** (`{params}`): {score}; {how} among {sel.ranked} finished trial(s)."
        if sel.note:
            text += f" {sel.note[0].upper()}{sel.note[1:]}."
    if sel.warning:
        text += f"\n\n**Warning: {sel.warning}**"
    return text


def predictions_section(
    run: Trial, out_dir: Path, heading: str, cache: Optional[PlotCache] = None
) -> tuple[str, list[Path], Optional[str]]:
    """Confusion matrix (markdown + PNG) and the wrong-digit grid of one run; a note if it has no predictions."""
    cache = cache or PlotCache(out_dir)
    try:
        pred = load_predictions(run.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        return "", [], f"{exc}; no confusion matrix or wrong digits for {run.label}"
    matrix = confusion_matrix(pred.y_true, pred.y_pred)
    wrong = int(matrix.sum() - np.trace(matrix))
    total = int(matrix.sum())
    confusions = ", ".join(f"{t}→{p} ({n})" for t, p, n in top_confusions(matrix))
    matrix_title = f"{heading}: confusion matrix on the test set ({wrong} of {total} wrong)"
    digits_title = f"{heading}: the {len(pred.wrong_index)} most confidently wrong test digits"
    source = run.run_dir / PREDICTIONS_FILE
    stat = source.stat()
    inputs = [str(source), stat.st_size, stat.st_mtime_ns]
    files = [
        cache.plot(
            out_dir / CONFUSION_PNG,
            cache.key("confusion", inputs, matrix_title),
            lambda: plot_confusion_matrix(matrix, out_dir / CONFUSION_PNG, matrix_title),
        ),
        cache.plot(
            out_dir / WRONG_DIGITS_PNG,
            cache.key("wrong", inputs, digits_title),
            lambda: plot_wrong_digits(pred, out_dir / WRONG_DIGITS_PNG, digits_title),
        ),
    ]
    text = "\n\n".join(
        [
            f"## {heading}: confusion matrix (test set; rows true digit, columns predicted)",
            confusion_markdown(matrix),
            f"{wrong} of {total} test digits wrong ({100 * wrong / max(total, 1):.2f}%)"
            + (f"; most frequent mistakes (true→pred): {confusions}." if confusions else "."),
            f"![confusion matrix]({CONFUSION_PNG})\n\n![most confidently wrong digits]({WRONG_DIGITS_PNG})",
        ]
    )
    return text, files, None


def summary_section(target: Path, trials: Sequence[Trial], selection: Optional[Selection]) -> str:
    """The heading, the state counts, the shared overrides and the best trial (sweeps) or the run's state."""
    kind = "sweep" if selection is not None else "run"
    parts = [f"# mnist-hpc report: {kind} {target}"]
    if selection is None:
        parts.append(f"State: {trials[0].state}. Overrides: `{' '.join(trials[0].overrides) or '(none)'}`")
        return "\n\n".join(parts)
    parts.append(f"{len(trials)} trial(s): {_state_counts(trials)}.")
    if shared := shared_overrides(trials):
        parts.append("Overrides shared by all trials: `" + " ".join(shared) + "`")
    parts.append(selection_text(selection, trials))
    return "\n\n".join(parts)


class PlotCache:
    """Skip re-drawing a PNG whose inputs have not changed since it was drawn.

    Reports are rerun often on a running sweep, and matplotlib's import and rendering cost
    seconds on a login node; a plot is redrawn only when the data it shows changed (its key:
    a hash of those inputs and of this module's plot version). Keys live in ``.plot-keys.json``
    in the output directory.
    """

    VERSION = 1
    FILE = ".plot-keys.json"

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / self.FILE
        self.keys: dict[str, str] = read_json(self.path) or {}
        self.changed = False

    @staticmethod
    def key(*inputs: Any) -> str:
        import hashlib

        blob = json.dumps([PlotCache.VERSION, *inputs], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def plot(self, png: Path, key: str, draw: Any) -> Path:
        if png.is_file() and self.keys.get(png.name) == key:
            return png
        draw()
        self.keys[png.name] = key
        self.changed = True
        return png

    def save(self) -> None:
        if self.changed:
            write_text_atomic(self.path, json.dumps(self.keys, indent=1, sort_keys=True) + "\n")


def trials_key(trials: Sequence[Trial], selection: Optional[Selection]) -> list[Any]:
    """Everything the sweep-level plots show."""
    best = selection.trial.number if selection and selection.trial else None
    rows = [
        (t.number, t.overrides, t.state, t.history, t.best_val_accuracy, t.val_accuracy, t.test_accuracy)
        for t in trials
    ]
    return [rows, best, selection.metric if selection else None]


def write_plots(
    trials: Sequence[Trial], out_dir: Path, selection: Optional[Selection], cache: Optional[PlotCache] = None
) -> tuple[list[Path], str]:
    """Learning curves, and for a sweep one metric-vs-parameter plot per swept parameter; their markdown."""
    cache = cache or PlotCache(out_dir)
    best = selection.trial if selection else None
    inputs = trials_key(trials, selection)
    png = out_dir / LEARNING_CURVES_PNG
    files = [cache.plot(png, cache.key("curves", inputs), lambda: plot_learning_curves(trials, png, best))]
    links = [f"![learning curves]({LEARNING_CURVES_PNG})"]
    if selection is not None:
        for key, values in swept_params(trials).items():
            target = out_dir / param_filename(key)
            png = cache.plot(
                target,
                cache.key("param", key, inputs),
                lambda key=key, values=values, target=target: plot_metric_vs_param(
                    trials, key, values, selection.metric, target, best
                ),
            )
            files.append(png)
            links.append(f"![{selection.metric} vs {key}]({png.name})")
    return files, "## Plots\n\n" + "\n\n".join(links)


def build_report(target: Path, out_dir: Optional[Path] = None, metric: str = "val_accuracy") -> Report:
    """Read a sweep or run directory, write the table and plots into ``out_dir``, return the markdown.

    Args:
        target: a sweep directory (numbered trials) or a single run directory.
        out_dir: where the files go; default ``<target>/report``.
        metric: what ranks a sweep's trials, ``val_accuracy`` (best epoch) or ``test_accuracy``.

    Raises:
        ReportError: ``target`` holds no trials and is not a run.
        OSError: the output directory cannot be written.
    """
    target = Path(target).resolve()
    is_sweep, run_dirs = find_runs(target)
    out_dir = Path(out_dir) if out_dir is not None else target / REPORT_DIR
    trials, notes = collect_trials(run_dirs)
    selection = best_trial(trials, metric) if is_sweep else None
    best = selection.trial if selection else None

    parts = [summary_section(target, trials, selection), markdown_table(trials, best)]
    parts += ["\n".join(f"- note: {n}" for n in notes)] if notes else []
    files = [write_csv(table_rows(trials, best), out_dir / CSV_FILE)]
    cache = PlotCache(out_dir)
    pngs, plot_links = write_plots(trials, out_dir, selection, cache)
    files += pngs
    parts.append(plot_links)
    # The confusion matrix and wrong digits of the best trial (sweep) or of the run itself.
    focus = best if is_sweep else trials[0]
    if focus is not None:
        heading = f"Best trial {focus.number}" if is_sweep else f"Run {focus.run_dir.name}"
        section, pngs, note = predictions_section(focus, out_dir, heading, cache)
        files += pngs
        parts.append(section or f"- note: {note}")
    cache.save()
    markdown = "\n\n".join(parts) + "\n"
    files.insert(0, write_markdown(markdown, out_dir / MARKDOWN_FILE))
    return Report(markdown=markdown, out_dir=out_dir, files=files, trials=trials, selection=selection)


def write_markdown(markdown: str, path: Path) -> Path:
    write_text_atomic(path, markdown)
    return path


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    write_text_atomic(path, csv_text(rows))
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-hpc-report",
        description=(
            "Summarise a sweep (or one run): a table of every trial with its state, epochs and accuracies, "
            "the best trial by validation accuracy, learning curves, metric-vs-hyperparameter plots, and the "
            "best trial's confusion matrix and most confidently wrong digits. Works while the sweep runs."
        ),
    )
    parser.add_argument("target", metavar="SWEEP_DIR|RUN_DIR", type=Path, help="a sweep directory or a run directory")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <target>/report)")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="val_accuracy",
        help="rank trials by the best epoch's validation accuracy (default) or by test accuracy "
        "(only for inspection: choosing by test accuracy is not model selection)",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = build_report(args.target, args.out, args.metric)
    except ReportError as exc:
        print(f"mnist-hpc-report: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"mnist-hpc-report: error: cannot write the report ({exc}); pass --out with a writable directory",
            file=sys.stderr,
        )
        return 1
    print(report.markdown, end="")
    if report.selection is not None and report.selection.warning:
        print(f"mnist-hpc-report: warning: {report.selection.warning}", file=sys.stderr)
    print(f"mnist-hpc-report: wrote {len(report.files)} files to {report.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
