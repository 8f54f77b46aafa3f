"""The report's plots (matplotlib, Agg, no pyplot) and the cache that skips redrawing them.

matplotlib is imported inside the drawing functions, so ``--help`` and a report whose plots
are unchanged never pay for it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from mnist_hpc.io import atomic_path, write_text_atomic
from mnist_hpc.login.report.ranking import (
    Selection,
    metric_value,
    swept_params,
    trial_params,
)
from mnist_hpc.login.report.tables import wrong_digit_titles
from mnist_hpc.login.trials import Trial
from mnist_hpc.rundir import Predictions

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

LEARNING_CURVES_PNG = "learning_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
WRONG_DIGITS_PNG = "wrong_digits.png"
# Numeric hyperparameters spanning this factor (a decade) or more get a logarithmic axis.
LOG_AXIS_SPAN = 10.0
# More trials than this and the learning-curve legend would hide the curves.
# More learning curves than this: only the best trial's and the highest others are drawn.
MAX_CURVES = 50
MAX_LEGEND_ENTRIES = 12
DPI = 110


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
    return save_png(learning_curves_figure(trials, best), path)


def learning_curves_figure(trials: Sequence[Trial], best: Optional[Trial] = None) -> "Figure":
    """The figure of :func:`plot_learning_curves`."""
    import matplotlib

    fig = _figure(8, 5)
    ax = fig.add_subplot()
    swept = swept_params(trials)
    curves = [(t, *learning_curve(t)) for t in trials]
    curves = [c for c in curves if c[2]]
    drawn_of = len(curves)
    if len(curves) > MAX_CURVES:
        # Thousands of lines are slow to draw and unreadable: the best trial and the highest others.
        curves.sort(key=lambda c: (c[0] is not best, -max(c[3])))
        curves = sorted(curves[:MAX_CURVES], key=lambda c: -1 if c[0].number is None else c[0].number)
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
    title = "Learning curves" if drawn_of <= MAX_CURVES else f"Learning curves: the {MAX_CURVES} highest of {drawn_of}"
    ax.set_title(title + (f" ({'; '.join(used)})" if used else ""), fontsize=9)
    epoch_axis(ax, sorted({e for c in curves for e in c[2]}))
    ax.grid(alpha=0.3)
    return fig


def epoch_axis(ax: Any, epochs: Sequence[int]) -> None:
    """Epochs are whole numbers: a tick per epoch when they are few, integer ticks otherwise."""
    from matplotlib.ticker import MaxNLocator

    if not epochs:
        return
    lo, hi = epochs[0], epochs[-1]
    ax.set_xlim(lo - 0.5, hi + 0.5) if hi - lo < 2 else None
    if hi - lo <= 20:
        ax.set_xticks(range(lo, hi + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


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
    """The ranking metric of each finished trial against one swept hyperparameter (see :func:`metric_vs_param_figure`)."""
    return save_png(metric_vs_param_figure(trials, key, values, metric, best), path)


def metric_vs_param_figure(
    trials: Sequence[Trial],
    key: str,
    values: Sequence[Optional[str]],
    metric: str,
    best: Optional[Trial] = None,
) -> "Figure":
    """The figure of :func:`plot_metric_vs_param`.

    Numeric values spanning ``LOG_AXIS_SPAN`` (a decade) or more get a log axis; other values (lists,
    names, or a parameter some trials leave at its default) are categories.
    """
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    numbers = numeric_values(values)
    shown = [(t, v, i) for i, (t, v) in enumerate(zip(trials, values)) if metric_value(t, metric) is not None]
    if numbers is not None:
        xs = [numbers[i] for _, _, i in shown]
        if min(numbers) > 0 and max(numbers) / min(numbers) >= LOG_AXIS_SPAN:
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
    return fig


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


class PlotCache:
    """Skip re-drawing a PNG whose inputs have not changed since it was drawn.

    Reports are rerun often on a running sweep, and matplotlib's import and rendering cost
    seconds on a login node; a plot is redrawn only when the data it shows changed (its key:
    a hash of those inputs and of this module's plot version). Keys live in ``.plot-keys.json``
    in the output directory.
    """

    VERSION = 2
    FILE = ".plot-keys.json"

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / self.FILE
        self.keys = self._load(self.path)
        self.drawn: list[str] = []

    @staticmethod
    def _load(path: Path) -> dict[str, str]:
        """The keys of the last report; a missing or damaged file just means "redraw everything"."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    @staticmethod
    def key(*inputs: Any) -> str:
        blob = json.dumps([PlotCache.VERSION, *inputs], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def plot(self, png: Path, key: str, draw: Any) -> Path:
        if png.is_file() and self.keys.get(png.name) == key:
            return png
        draw()
        self.keys[png.name] = key
        self.drawn.append(png.name)
        return png

    def save(self) -> None:
        if self.drawn:
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
