"""The report's view of an asynchronous search: trials in their Optuna state, best parameters, and
Optuna's optimisation-history and parameter-importance plots (its matplotlib versions).

:func:`search_report` is called by :func:`mnist_hpc.login.report.build.build_report` when the
target holds ``search.json``. Login-node code: Optuna and matplotlib, never TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mnist_hpc import search as sd
from mnist_hpc.login.report.plots import PlotCache, save_png
from mnist_hpc.login.study import StudyView, run_note, run_state, run_value, sampled, summary_lines, trial_note
from mnist_hpc.login.trials import Trial

HISTORY_PNG = "optimization_history.png"
IMPORTANCE_PNG = "param_importances.png"


def apply_study_states(view: StudyView, trials: Sequence[Trial]) -> None:
    """The study decides a search trial's state (PRUNED, FAILED, INTERRUPTED...), not its worker's
    Slurm job, which runs many trials; its note replaces the error line of the worker's shared log.
    When the journal cannot be read, each trial's own directory and its worker decide."""
    by_number = {t.number: t for t in view.trials}
    for trial in trials:
        if view.journal_problem is not None:
            trial.state = run_state(view, trial)
            trial.error = None if trial.finished else (run_note(view, trial) or None)
            continue
        frozen = by_number.get(trial.number)
        if frozen is None:
            continue
        trial.state = view.state(frozen)
        trial.error = None if trial.finished else (trial_note(view, frozen) or None)


def _plot(view: StudyView, png: Path, which: str) -> Path:
    """Draw one of Optuna's matplotlib plots of the study into ``png`` (Agg, atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    assert view.spec is not None and view.storage is not None
    study = optuna.load_study(study_name=view.spec.study_name, storage=view.storage)
    # Optuna's plots switch pyplot's global style; keep that from the report's own plots.
    with matplotlib.rc_context():
        if which == "history":
            ax = ovm.plot_optimization_history(study, target_name="validation accuracy")
        else:
            # PED-ANOVA needs no scikit-learn (Optuna's default fANOVA does).
            from optuna.importance import PedAnovaImportanceEvaluator

            ax = ovm.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), target_name="validation accuracy")
    fig = ax.figure
    fig.set_size_inches(8, 4.5)
    fig.tight_layout()
    try:
        return save_png(fig, png)
    finally:
        plt.close(fig)


def study_plots(view: StudyView, out_dir: Path, cache: PlotCache) -> tuple[list[Path], list[str], list[str]]:
    """The two plots (when the study has enough complete trials), their links, and notes."""
    if view.journal_problem is not None:
        return [], [], ["no optimisation plots: the study's journal cannot be read"]
    complete = [t for t in view.trials if view.value(t) is not None]
    if len(complete) < 2:
        return [], [], [f"the study has {len(complete)} complete trial(s); its plots need 2"]
    key_rows = [(t.number, t.state.name, t.value, sorted((k, str(v)) for k, v in t.params.items())) for t in view.trials]
    files, links, notes = [], [], []
    for which, png, title in (("history", HISTORY_PNG, "optimisation history"), ("importance", IMPORTANCE_PNG, "parameter importances")):
        try:
            files.append(cache.plot(out_dir / png, cache.key(which, key_rows), lambda w=which, p=png: _plot(view, out_dir / p, w)))
            links.append(f"![{title}]({png})")
        except Exception as exc:  # an Optuna plot that cannot be drawn (e.g. too few distinct values)
            notes.append(f"no {title} plot: {type(exc).__name__}: {exc}")
    return files, links, notes


def study_markdown(view: StudyView) -> str:
    """The study's section: its summary, the best parameters, and every trial with its Optuna state
    (or, when the journal cannot be read, with the state its own directory shows)."""
    parts = ["## Study (Optuna)", "\n\n".join(summary_lines(view))]
    if view.journal_problem is not None:
        rows = ["| trial | state (from its directory) | value | worker | overrides | note |", "|---|---|---|---|---|---|"]
        for n, run in sorted(view.runs.items()):
            value = "-" if (v := run_value(run)) is None else f"{v:.4f}"
            rows.append(f"| {n} | {run_state(view, run)} | {value} | {run.job_id} | `{' '.join(sampled(view, run))}` | "
                        f"{run_note(view, run) or '-'} |")
        return "\n\n".join(parts + ["\n".join(rows)])
    best = view.best
    if best is not None:
        parts.append("Best parameters (chosen on validation accuracy):\n\n" + "\n".join(f"- `{k}={v}`" for k, v in best.params.items()))
    rows = ["| trial | Optuna state | value | worker | parameters | note |", "|---|---|---|---|---|---|"]
    for t in view.trials:
        params = " ".join(f"{k}={v}" for k, v in t.params.items())
        value = "-" if (v := view.value(t)) is None else f"{v:.4f}"
        rows.append(f"| {t.number} | {view.state(t)} | {value} | {t.user_attrs.get(sd.WORKER_ATTR, '-')} | `{params}` | {trial_note(view, t) or '-'} |")
    parts.append("\n".join(rows))
    return "\n\n".join(parts)


def search_report(view: StudyView, trials: Sequence[Trial], out_dir: Path, cache: PlotCache) -> tuple[str, list[Path], list[str]]:
    """Apply the study's states to ``trials``; return the study section, its plot files and notes."""
    apply_study_states(view, trials)
    files, links, notes = study_plots(view, out_dir, cache)
    section = study_markdown(view) + ("\n\n" + "\n\n".join(links) if links else "")
    return section, files, view.notes + notes
