"""The report's text: the trial table (Markdown and CSV), the confusion matrix, the summary."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from mnist_hpc.login.report.ranking import (
    Selection,
    shared_overrides,
    shown_settings,
    swept_params,
)
from mnist_hpc.login.trials import Trial
from mnist_hpc.rundir import Predictions

N_CLASSES = 10


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
                **_cost_columns(t),
                "error": t.error or "",
                "run_dir": str(t.run_dir),
            }
        )
        rows.append(row)
    return rows


COST_COLUMNS = ("cpu_time_s", "cpu_efficiency", "core_hours", "gpu_hours", "max_rss_gb", "req_mem_gb", "share")


def _cost_columns(trial: Trial) -> dict[str, Any]:
    """Its job's figures from accounting (its share of a shared job's); empty before it started."""
    cost = trial.cost_row() or {}
    return {key: "" if cost.get(key) is None else cost[key] for key in COST_COLUMNS}


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
        overrides = shown_settings(t, swept)
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


def wrong_digit_titles(pred: Predictions) -> list[str]:
    """``true T / pred P (conf%)`` for each kept wrong digit, in the stored order (most confident first)."""
    titles = []
    for index in pred.wrong_index:
        true, guess = int(pred.y_true[index]), int(pred.y_pred[index])
        conf = 100 * float(pred.y_prob[index, guess])
        # A wrong answer given with 99.97% must not read as "100.0%".
        titles.append(f"true {true} / pred {guess} ({f'{conf:.1f}%' if conf < 99.95 else '>99.9%'})")
    return titles


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
            params = " ".join(shown_settings(t, swept_params(trials))) or params
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
