"""Which trial is best, and by what: the report's ranking of a sweep's trials.

Trials are ranked by validation accuracy (the best epoch's); the test set never chooses
unless asked to, and then the report says why that is not model selection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

from mnist_hpc.login.trials import Trial

METRICS = ("val_accuracy", "test_accuracy")


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


def parse_override(override: str) -> tuple[str, Optional[str]]:
    """``optimizer.learning_rate=1e-3`` -> (``optimizer.learning_rate``, ``1e-3``); ``+``/``~`` prefixes dropped."""
    key, sep, value = override.partition("=")
    return key.lstrip("+~"), (value if sep else None)


def _identity_text(value: object) -> str:
    """An identity.json value as an override would spell it (``true``, ``0.001``, ``abc``)."""
    return value if isinstance(value, str) else json.dumps(value)


def trial_params(trial: Trial) -> dict[str, Optional[str]]:
    """The trial's settings: its overrides, then every key of the config its results come from.

    The identity (``identity.json``) holds what no override shows: the data's sha256 when
    ``MNIST_HPC_CACHE`` pointed elsewhere, a default another release changed. Two trials with the
    same overrides but another identity are different configs, and are shown so.
    """
    params = dict(parse_override(o) for o in trial.overrides)
    for key, value in (trial.files.identity or {}).items():
        params.setdefault(key, _identity_text(value))
    return params


def swept_params(trials: Sequence[Trial]) -> dict[str, list[Optional[str]]]:
    """The keys whose values differ between trials, with each trial's value (None: not set).

    An override key is swept when the trials' overrides differ. A key only the identity holds is
    swept when it differs between the trials that have an identity (a queued trial has none yet,
    and is no reason to show every key).
    """
    params = [trial_params(t) for t in trials]
    keys: list[str] = []
    for t in trials:
        keys += [k for k in (parse_override(o)[0] for o in t.overrides) if k not in keys]
    values = {k: [p.get(k) for p in params] for k in keys}
    swept = {k: v for k, v in values.items() if len(set(v)) > 1}
    bound = [p for t, p in zip(trials, params) if t.files.identity is not None]
    for key in dict.fromkeys(k for t in trials for k in (t.files.identity or {})):
        if key not in values and len({p.get(key) for p in bound}) > 1:
            swept[key] = [p.get(key) for p in params]
    return swept


def shown_settings(trial: Trial, swept: Optional[dict[str, list[Optional[str]]]]) -> list[str]:
    """What tells ``trial`` apart from the others: its swept overrides as written, then the swept keys
    only its identity holds (long values such as a sha256 cut to 12 characters). All its overrides
    when ``swept`` is None (a single trial)."""
    if swept is None:
        return list(trial.overrides)
    shown = [o for o in trial.overrides if parse_override(o)[0] in swept]
    own = {parse_override(o)[0] for o in trial.overrides}
    params = trial_params(trial)
    for key, values in swept.items():
        if key not in own and params.get(key) is not None:
            value = str(params[key])
            shown.append(f"{key}={_cut(value) if _cut_keeps_apart(values) else value}")
    return shown


def _cut(value: str) -> str:
    return value if len(value) <= 16 else value[:12] + "…"


def _cut_keeps_apart(values: Sequence[Optional[str]]) -> bool:
    """Whether cutting still tells every value apart (a sha256 does at 12 characters; ``[1024, 1024,
    512]`` and ``[1024, 1024, 256]`` do not, and are shown whole)."""
    whole = {str(v) for v in values if v is not None}
    return len({_cut(v) for v in whole}) == len(whole)


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
