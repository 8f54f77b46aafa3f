"""Assembling the report: read the trials, rank them, write the tables and plots.

:func:`build_report` is what ``mnist-hpc-report`` runs (see :mod:`.cli`). Login-node code:
numpy and matplotlib, never TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from mnist_hpc import rundir
from mnist_hpc.io import sha256_file, write_text_atomic
from mnist_hpc.login.report.cost import cost_section
from mnist_hpc.login.report.plots import (
    CONFUSION_PNG,
    WRONG_DIGITS_PNG,
    PlotCache,
    plot_confusion_matrix,
    plot_wrong_digits,
    write_plots,
)
from mnist_hpc.login.report.ranking import Selection, best_trial
from mnist_hpc.login.report.tables import (
    confusion_markdown,
    confusion_matrix,
    csv_text,
    markdown_table,
    summary_section,
    table_rows,
    top_confusions,
)
from mnist_hpc.login.report.study import search_report
from mnist_hpc.login.study import read_study, set_worker_jobs, worker_jobs
from mnist_hpc.login.trials import Trial, fill_states, find_runs, read_trial, read_trials, sort_trials, trial_dirs
from mnist_hpc.search import is_search_dir

REPORT_DIR = "report"
CSV_FILE = "report.csv"
MARKDOWN_FILE = "report.md"


@dataclass
class Report:
    """What :func:`build_report` made: the markdown text and the files written."""

    markdown: str
    out_dir: Path
    files: list[Path]
    trials: list[Trial]
    selection: Optional[Selection]
    # The PNGs this call drew; the others were unchanged since the last report and kept.
    drawn: list[str]


def predictions_section(
    run: Trial, out_dir: Path, heading: str, cache: Optional[PlotCache] = None
) -> tuple[str, list[Path], Optional[str]]:
    """Confusion matrix (markdown + PNG) and the wrong-digit grid of one run; a note if it has no predictions."""
    cache = cache or PlotCache(out_dir)
    try:
        pred = rundir.load_predictions(run.run_dir)
    except (FileNotFoundError, rundir.RunFileError) as exc:
        return "", [], f"{exc}; no confusion matrix or wrong digits for {run.label}"
    matrix = confusion_matrix(pred.y_true, pred.y_pred)
    wrong = int(matrix.sum() - np.trace(matrix))
    total = int(matrix.sum())
    confusions = ", ".join(f"{t}→{p} ({n})" for t, p, n in top_confusions(matrix))
    matrix_title = f"{heading}: confusion matrix on the test set ({wrong} of {total} wrong)"
    digits_title = f"{heading}: the {len(pred.wrong_index)} most confidently wrong test digits"
    # By content: a rewritten file with the same size and time stamp (coarse clocks) still counts as new.
    inputs = [sha256_file(run.run_dir / rundir.PREDICTIONS_FILE)]
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


def build_report(target: Path, out_dir: Optional[Path] = None, metric: str = "val_accuracy") -> Report:
    """Read a sweep or run directory, write the table and plots into ``out_dir``, return the markdown.

    Args:
        target: a sweep directory (numbered trials) or a single run directory.
        out_dir: where the files go; default ``<target>/report``.
        metric: what ranks a sweep's trials, ``val_accuracy`` (best epoch) or ``test_accuracy``.

    Raises:
        TargetError: ``target`` holds no trials and is not a run.
        OSError: the output directory cannot be written.
    """
    target = Path(target).resolve()
    # A search has its study even before its first trial directory exists.
    # Unordered: the trials are sorted once read (each job.json is read once).
    is_sweep, run_dirs = (True, trial_dirs(target, ordered=False)) if is_search_dir(target) else find_runs(target, False)
    out_dir = Path(out_dir) if out_dir is not None else target / REPORT_DIR
    if is_search_dir(target):
        # The study and its workers; their Slurm jobs are asked in the same query as the trials'.
        view = read_study(target, with_slurm=False)
        workers = worker_jobs(view)
        filled, notes = fill_states([read_trial(d) for d in run_dirs] + workers)
        trials = [t for t in filled if t.run_dir is not None]
        set_worker_jobs(view, {t.job_id: t for t in filled if t.run_dir is None})
    else:
        trials, notes = read_trials(run_dirs)
    trials = sort_trials(trials)
    cache = PlotCache(out_dir)
    # An asynchronous search: its study decides each trial's state and adds its own section.
    search = search_report(view, trials, out_dir, cache) if is_search_dir(target) else ("", [], [])
    notes += search[2]
    notes += [f"{t.label}: {note}" for t in trials for note in t.notes]
    selection = best_trial(trials, metric) if is_sweep else None
    best = selection.trial if selection else None

    parts = [summary_section(target, trials, selection), markdown_table(trials, best), cost_section(trials)]
    parts += ["\n".join(f"- note: {n}" for n in notes)] if notes else []
    files = [write_csv(table_rows(trials, best), out_dir / CSV_FILE)] + search[1]
    pngs, plot_links = write_plots(trials, out_dir, selection, cache)
    files += pngs
    parts += [search[0]] if search[0] else []
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
    return Report(markdown=markdown, out_dir=out_dir, files=files, trials=trials, selection=selection, drawn=cache.drawn)


def write_markdown(markdown: str, path: Path) -> Path:
    write_text_atomic(path, markdown)
    return path


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    write_text_atomic(path, csv_text(rows))
    return path


def run_report_task(task: Any) -> str:
    """The runner of a :class:`~mnist_hpc.contract.tasks.ReportTask`: the sweep's report, once its tasks ended."""
    report = build_report(Path(task.sweep_dir))
    print(report.markdown, flush=True)
    return str(report.out_dir)
