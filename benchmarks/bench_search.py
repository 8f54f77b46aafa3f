"""Asynchronous search against the batch-synchronous sweeper, on this machine's local Slurm cluster.

Issue 13's benchmark: a 16-trial Optuna search whose trial lengths differ (hidden units 64 to
1024, 1 to 5 epochs, learning rate log-uniform), run in one invocation, one after the other on
the same cluster:

- **batch** (baseline): hydra-optuna-sweeper, TPE with seed 0, batches of ``n_jobs=2`` trials,
  each batch one Slurm array through this project's launcher with ``hydra.launcher.wait=true``
  (the sweeper needs a batch's results before it proposes the next);
- **async**: ``hparams_search=optuna`` with 2 workers, TPE with seed 0 (made distinct per
  worker), pruning off so that both runs train the same kind of trials;
- **replay**: the asynchronous workers given exactly the batch run's 16 trials
  (``hydra.sweeper.enqueue``): the same training work, so the difference is the schedule alone.

Reported per run: wall time from the submit command's start until the study holds 16 finished
trials, the submit command's own time, the summed training time of the trials (each trial's
``metrics.json`` ``wall_time_s``: the same code in both), and the workers' idle fraction
``1 - sum(trial time) / (2 x wall time)``: the share of the two CPU slots that did not train
(waiting for the slowest trial of a batch, Slurm scheduling, Python and TensorFlow start-up per
job). Also the load average before and after each run (other work on the machine slows both).

The baseline runs in a separate environment, since hydra-optuna-sweeper pins optuna<3 and the
search needs optuna>=4::

    python -m venv --system-site-packages /tmp/hos && /tmp/hos/bin/pip install hydra-optuna-sweeper==1.3.0
    python benchmarks/bench_search.py --data ../shared/data/mnist.npz --baseline-python /tmp/hos/bin/python

Needs the cluster (``slurm/cluster.sh start``). Writes search.md and search.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mnist_hpc.io import write_json_atomic, write_text_atomic  # noqa: E402

TRIALS = 16
WORKERS = 2
TARGET = 1.3
SPACE = {
    "model.hidden_units": "choice('[64]','[128]','[256]','[512]','[1024]')",
    "train.epochs": "int(interval(1, 5))",
    "optimizer.learning_rate": "tag(log, interval(1e-4, 1e-2))",
}
# The asynchronous search's config for the benchmark: only SPACE (not the default params), no pruning.
ASYNC_YAML = """# @package _global_
defaults:
  - override /hydra/sweeper: async_optuna
  - override /hydra/launcher: slurm
data:
  validation_split: 0.1
hydra:
  sweeper:
    n_trials: {trials}
    workers: {workers}
    pruner: null
    enqueue: {enqueue}
    sampler:
      _target_: optuna.samplers.TPESampler
      seed: 0
    params:
{params}
"""
# The baseline's config: the sweeper this project used before (hydra-optuna-sweeper), same space.
BATCH_YAML = """# @package _global_
defaults:
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: tpe
  - override /hydra/launcher: slurm
data:
  validation_split: 0.1
hydra:
  launcher:
    wait: true
  sweeper:
    direction: maximize
    study_name: bench
    storage: null
    n_trials: {trials}
    n_jobs: {workers}
    sampler:
      seed: 0
    params:
{params}
"""
TRAIN = "from mnist_hpc.cli import train_main; train_main()"


def common_args(search_dir: Path, cache: Path, work: Path) -> list[str]:
    return [
        "-m", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=30",
        f"hydra.sweep.dir={search_dir}", f"data.cache_dir={cache}", f"paths.output_root={work}",
    ]


def trial_seconds(search_dir: Path) -> list[float]:
    """Each trial's own training wall time (``metrics.json``), for every trial that finished."""
    out = []
    for metrics in search_dir.glob("*/metrics.json"):
        out.append(float(json.loads(metrics.read_text())["wall_time_s"]))
    return out


def search_config(work: Path, name: str, template: str, enqueue: Optional[list[dict[str, Any]]] = None) -> list[str]:
    """Write ``hparams_search/<name>.yaml`` (the same SPACE in all) and the overrides that select it."""
    confdir = work / "bench-conf" / "hparams_search"
    confdir.mkdir(parents=True, exist_ok=True)
    params = "\n".join(f"      {k}: {v}" for k, v in SPACE.items())
    text = template.format(trials=TRIALS, workers=WORKERS, params=params, enqueue=json.dumps(enqueue or []))
    (confdir / f"{name}.yaml").write_text(text)
    return [f"hparams_search={name}", f"hydra.searchpath=[file://{work / 'bench-conf'}]"]


def run_batch(python: str, search_dir: Path, cache: Path, work: Path) -> dict[str, Any]:
    cmd = [python, "-c", TRAIN, *common_args(search_dir, cache, work), *search_config(work, "batch", BATCH_YAML)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"baseline failed: {proc.stderr[-3000:]}")
    return {"wall_s": wall, "submit_s": wall, "trial_s": trial_seconds(search_dir)}


def batch_trials(search_dir: Path) -> list[dict[str, Any]]:
    """The parameters of a batch run's trials, in trial order, as the asynchronous search's
    ``enqueue`` takes them: replaying them trains exactly the same trials."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    from mnist_hpc import search as sd
    from mnist_hpc.rundir import hydra_overrides

    space, _ = sd.parse_params(SPACE)
    out = []
    for run in sorted((d for d in search_dir.iterdir() if d.name.isdigit()), key=lambda d: int(d.name)):
        values = dict(o.split("=", 1) for o in hydra_overrides(run))
        kinds = {k: str if isinstance(d, CategoricalDistribution) else int if isinstance(d, IntDistribution) else float
                 for k, d in space.items()}
        out.append({k: kinds[k](values[k]) for k in SPACE})
    return out


def run_async(search_dir: Path, cache: Path, work: Path, replay: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    import optuna

    from mnist_hpc import search as sd

    config = search_config(work, f"bench_async_{search_dir.name}", ASYNC_YAML, replay)
    cmd = [sys.executable, "-c", TRAIN, *common_args(search_dir, cache, work), *config]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env())
    submit_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"async submission failed: {proc.stderr[-3000:]}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    while True:
        trials = optuna.load_study(study_name="mnist-hpc", storage=sd.open_storage(search_dir)).get_trials()
        if sum(sd.counts_toward_budget(t) for t in trials) >= TRIALS:
            break
        if time.perf_counter() - start > 3600:
            raise SystemExit("the asynchronous search did not finish within an hour")
        time.sleep(0.5)
    wall = time.perf_counter() - start
    assert all(set(t.params) == set(SPACE) for t in trials), "the search sampled another space"
    failed = [t.number for t in trials if t.state.name != "COMPLETE"]
    if failed:
        raise SystemExit(f"asynchronous trials did not complete: {failed}")
    return {"wall_s": wall, "submit_s": submit_s, "trial_s": trial_seconds(search_dir)}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def summarise(run: dict[str, Any], load_before: tuple, load_after: tuple) -> dict[str, Any]:
    busy = sum(run["trial_s"])
    return {
        **run,
        "trials": len(run["trial_s"]),
        "busy_s": busy,
        "idle_fraction": 1.0 - busy / (WORKERS * run["wall_s"]),
        "load_before": list(load_before),
        "load_after": list(load_after),
    }


def compare(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per kind, and the speed-ups per repeat (each batch run against the async and replay
    runs of the same repeat, which ran next to it: a drift in the machine's load cancels out)."""
    out: dict[str, Any] = {}
    for name, kind_runs in runs.items():
        out[name] = {
            key: statistics.median(r[key] for r in kind_runs)
            for key in ("wall_s", "submit_s", "busy_s", "idle_fraction", "trials")
        }
        out[name]["load"] = statistics.mean(r["load_before"][0] for r in kind_runs)
    out["speedups_per_pair"] = [b["wall_s"] / a["wall_s"] for b, a in zip(runs["batch"], runs["async"])]
    out["speedup"] = statistics.median(out["speedups_per_pair"])
    # The replay is compared with the very batch run whose trials it trains.
    out["replay_speedups"] = [b["wall_s"] / a["wall_s"] for b, a in zip(runs["batch"], runs["replay"])]
    out["replay_speedup"] = statistics.median(out["replay_speedups"])
    return out


def markdown(results: dict[str, Any]) -> str:
    b, a, r = results["batch"], results["async"], results["replay"]
    cols = (b, a, r)
    rows = [
        "| | batch-synchronous (hydra-optuna-sweeper, n_jobs=2) | asynchronous search (2 workers) "
        "| asynchronous, replaying the batch run's 16 trials |",
        "|---|---|---|---|",
        "| wall time, submit to 16 trials done | " + " | ".join(f"{c['wall_s']:.1f} s" for c in cols) + " |",
        f"| submit command returned after | {b['submit_s']:.1f} s (it waits for the search) "
        f"| {a['submit_s']:.1f} s | {r['submit_s']:.1f} s |",
        "| trials finished | " + " | ".join(f"{c['trials']:.0f}" for c in cols) + " |",
        "| summed trial training time | " + " | ".join(f"{c['busy_s']:.1f} s" for c in cols) + " |",
        "| workers' idle fraction | " + " | ".join(f"{c['idle_fraction']:.1%}" for c in cols) + " |",
        "| mean load average at the start (1 min; 2 CPUs) | " + " | ".join(f"{c['load']:.1f}" for c in cols) + " |",
    ]
    speedup = results["speedup"]
    verdict = "met" if speedup >= TARGET else "NOT met"
    every = "; ".join(
        f"{name}: " + ", ".join(f"{x['wall_s']:.1f} s (idle {x['idle_fraction']:.0%}, load {x['load_before'][0]:.1f})"
                                for x in results["runs"][name])
        for name in ("batch", "async", "replay")
    )
    pairs = ", ".join(f"{x:.2f}x" for x in results["speedups_per_pair"])
    replays = ", ".join(f"{x:.2f}x" for x in results["replay_speedups"])
    return "\n".join([
        "# Asynchronous search vs batch-synchronous sweeper",
        "",
        f"Generated by `benchmarks/bench_search.py` on {results['machine']} ({results['date']}), "
        f"local Slurm cluster shared with other work, 1 CPU per task, {results['data']}.",
        "",
        "16-trial Optuna search (TPE, seed 0, no pruning), space: "
        + ", ".join(f"`{k}: {v}`" for k, v in SPACE.items()) + ". All runs one after the other; per "
        "repeat: batch and async (alternating which goes first), then the replay of that repeat's batch "
        "trials. The table shows each kind's medians over its runs.",
        "",
        *rows,
        "",
        f"Every run: {every}.",
        "",
        f"**Speed-up of the search: median {speedup:.2f}x** (per repeat {pairs}; target {TARGET}x: "
        f"{verdict}). The two searches train different trials (each proposes from its own history, and "
        "the workers' samplers are seeded per worker), so their summed training times differ; the "
        f"replay trains exactly the batch run's trials, and its speed-up over that run, **median "
        f"{results['replay_speedup']:.2f}x** (per repeat {replays}), is the gain from the schedule alone.",
        "",
        "Idle fraction: 1 - summed trial time / (2 x wall time): the share of the two CPU slots not "
        "spent training (a batch waiting for its slowest trial, Slurm scheduling, and one Python + "
        "TensorFlow start-up per trial for the batch sweeper against one per worker for the search).",
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a local mnist.npz (e.g. ../shared/data/mnist.npz)")
    parser.add_argument("--baseline-python", help="a Python with hydra-optuna-sweeper (see above)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind")
    parser.add_argument("--render-only", action="store_true", help="rewrite search.md from search.json")
    args = parser.parse_args()
    if args.render_only:  # e.g. after the text changed: the figures stay those measured
        results = json.loads((args.out / "search.json").read_text())
        results.update(compare(results["runs"]))
        write_json_atomic(args.out / "search.json", results)
        write_text_atomic(args.out / "search.md", markdown(results))
        return 0
    if not args.baseline_python or not args.data:
        parser.error("--data and --baseline-python are required to measure")
    probe = subprocess.run([args.baseline_python, "-c", "import hydra_plugins.hydra_optuna_sweeper, mnist_hpc"],
                           capture_output=True, env=env())
    if probe.returncode != 0:
        raise SystemExit(f"{args.baseline_python} lacks hydra-optuna-sweeper: {probe.stderr.decode()[-500:]}")

    from mnist_hpc.login.prefetch.fetch import prefetch

    work = Path(tempfile.mkdtemp(prefix="mnist-hpc-bench-search-"))
    cache = work / "cache"
    prefetch(cache / "mnist.npz", source=args.data)
    results: dict[str, Any] = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "data": f"real MNIST ({args.data.name}, validation split 0.1)",
        "trials": TRIALS,
        "workers": WORKERS,
        "space": SPACE,
    }
    # Per repeat: batch and async in alternating order (a drift in the machine's load hits both),
    # then "replay": the asynchronous workers training exactly the batch run's 16 trials.
    kinds = ("batch", "async", "replay")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for i in range(args.repeats):
        for name in (("batch", "async") if i % 2 == 0 else ("async", "batch")) + ("replay",):
            print(f"{name} (repeat {i + 1}/{args.repeats}) ...", flush=True)
            load_before = os.getloadavg()
            search_dir = work / f"{name}-{i}"
            if name == "batch":
                run = run_batch(args.baseline_python, search_dir, cache, work)
            else:
                run = run_async(search_dir, cache, work, batch_trials(work / f"batch-{i}") if name == "replay" else None)
            runs[name].append(summarise(run, load_before, os.getloadavg()))
            print(f"  {runs[name][-1]['wall_s']:.1f} s, idle {runs[name][-1]['idle_fraction']:.1%}", flush=True)
    results["runs"] = runs
    results.update(compare(runs))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "search.json", results)
    write_text_atomic(args.out / "search.md", markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
