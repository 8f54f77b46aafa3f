"""Where a trial's wall time goes, for a single run and for a packed task (issue 15).

Each measurement runs in a fresh Python process (this file with ``--child``), on the real MNIST
from a cache prefetched with ``mnist-hpc-prefetch --from``, with the default config (the
compiled loop with XLA):

- **single**: one 5-epoch run, as ``mnist-hpc-train`` runs it (it traces and compiles its XLA
  program);
- **packed**: ``--packed`` one-epoch trials (seeds 0, 1, ...) one after another in one process,
  as a task of ``hydra.launcher.trials_per_task`` runs them;
- **search** (``--search N``, needs the local cluster): one search worker (``hparams_search``,
  1 worker, 2 CPUs) running N one-epoch trials over the learning rate, with a 10% validation
  split as the search has; besides each trial's phases, the worker's start (submission to its
  first trial) and the time between two trials (tell, ask, compose, record), from the trials'
  ``metrics.json`` (written when a trial ends) and wall times.

The parts come from the run itself (``metrics.json``: ``phases`` and each epoch's seconds) and
from the parent's clock: interpreter start and imports (process start until the child has
imported TensorFlow, Keras and the training code), cache check and load, claiming the run
directory, TensorFlow set-up and model build, the first epoch (tracing and XLA compilation
included), the steady epochs, evaluation (one prediction pass, the test scores computed from it),
writing outputs, and the process's exit.

Ratios reported against the targets of issue 15, measured in this one run:

- single run: process start to outputs written, over (imports + 5 steady epochs);
- packed one-epoch trials: median seconds per trial beyond one steady epoch (the steady epoch
  is the single run's median of epochs 2-5), with the process's start-up shared among them.

    python benchmarks/bench_breakdown.py --data ../shared/data/mnist.npz [--packed 16] [--repeats 2] [--search 8]

Writes breakdown.md and breakdown.json into ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

PHASES = ("load_s", "claim_s", "setup_s", "evaluate_s", "write_s")


def child(cache_dir: str, work: str, trials: int, epochs: int) -> None:
    """Run ``trials`` trials in this process; print one JSON record (the parent times the process)."""
    imported_unix = None
    import logging

    from hydra import compose, initialize_config_dir

    from mnist_hpc.compute.job import _reset_keras_state
    from mnist_hpc.compute.train import train_and_evaluate
    from mnist_hpc.config import conf_dir, register_configs, to_typed

    from mnist_hpc.compute.runtime import import_tensorflow

    import_tensorflow()  # timed as part of the imports, as a job pays for it

    imported_unix = time.time()
    logging.basicConfig(level=logging.WARNING)
    register_configs()
    out = []
    for seed in range(trials):
        run_dir = Path(work) / f"trial-{seed}"
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = to_typed(compose("config", overrides=[f"data.cache_dir={cache_dir}", f"train.epochs={epochs}",
                                                        f"train.seed={seed}", f"paths.output_root={work}"]))
        begin = time.time()
        result = train_and_evaluate(cfg, run_dir)
        _reset_keras_state()  # as a packed task does between its trials
        metrics = json.loads((run_dir / "metrics.json").read_text())
        out.append({"begin_unix": begin, "end_unix": time.time(), "wall_time_s": metrics["wall_time_s"],
                    "phases": metrics["phases"], "epoch_s": [row["seconds"] for row in metrics["history"]],
                    "test_accuracy": result["test_accuracy"]})
    print(json.dumps({"imported_unix": imported_unix, "trials": out, "done_unix": time.time()}))


def run(cache_dir: Path, work: Path, trials: int, epochs: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", str(cache_dir), str(work), str(trials), str(epochs)],
                          capture_output=True, text=True, timeout=3600, env=env, cwd=REPO)
    exited = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record.update(start_unix=start, exit_s=exited - start, imports_s=record["imported_unix"] - start,
                  load_average=os.getloadavg()[0])
    return record


# The search's parameters: the learning rate only, so that every trial has the same shapes.
SEARCH_PARAMS = "      optimizer.learning_rate: tag(log, interval(1e-4, 1e-2))"


def run_search(cache_dir: Path, work: Path, trials: int) -> dict[str, Any]:
    """One search worker on the local cluster; the trials' records in the order they ran."""
    import shutil

    conf = work / "conf" / "hparams_search"
    conf.mkdir(parents=True)
    from bench_search import ASYNC_YAML

    (conf / "bench_breakdown.yaml").write_text(ASYNC_YAML.format(trials=trials, workers=1, enqueue="[]", params=SEARCH_PARAMS))
    search_dir = work / "search"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.time()
    proc = subprocess.run(
        [shutil.which("mnist-hpc-train") or "mnist-hpc-train", "-m", "hparams_search=bench_breakdown",
         f"hydra.searchpath=[file://{work / 'conf'}]", "hydra.launcher.cpus_per_task=2", "hydra.launcher.mem_gb=4",
         f"hydra.sweep.dir={search_dir}", f"data.cache_dir={cache_dir}", f"paths.output_root={work}", "train.epochs=1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"search submission failed:\n{proc.stderr[-3000:]}")
    deadline = time.time() + 1800
    while len(list(search_dir.glob("*/metrics.json"))) < trials:
        if time.time() > deadline:
            raise RuntimeError("the search worker did not finish its trials within 30 minutes")
        time.sleep(1)
    files = sorted(search_dir.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    out = []
    for path in files:
        metrics = json.loads(path.read_text())
        end = path.stat().st_mtime
        out.append({"begin_unix": end - metrics["wall_time_s"], "end_unix": end, "wall_time_s": metrics["wall_time_s"],
                    "phases": metrics["phases"], "epoch_s": [row["seconds"] for row in metrics["history"]]})
    return {"submitted_unix": start, "trials": out}


def summarise_search(search: dict[str, Any]) -> dict[str, Any]:
    trials = search["trials"]
    gaps = [b["begin_unix"] - a["end_unix"] for a, b in zip(trials, trials[1:])]
    later = trials[1:]  # the first trial also pays TensorFlow's import and the first compilation
    return {
        "trials": len(trials),
        "worker_start_s": trials[0]["begin_unix"] - search["submitted_unix"],
        "first_trial_wall_s": trials[0]["wall_time_s"],
        "median_between_trials_s": statistics.median(gaps),
        "median_phases": {k: statistics.median(t["phases"][k] for t in later) for k in PHASES},
        "median_epoch_s": statistics.median(t["epoch_s"][0] for t in later),
        "median_wall_s": statistics.median(t["wall_time_s"] for t in later),
        "median_beyond_epoch_s": statistics.median(t["wall_time_s"] - t["epoch_s"][0] for t in later),
    }


def summarise(single: dict[str, Any], packed: dict[str, Any]) -> dict[str, Any]:
    return {"single": _single(single), "packed": _packed(packed, _single(single))}


def _single(single: dict[str, Any]) -> dict[str, Any]:
    [trial] = single["trials"]
    steady = statistics.median(trial["epoch_s"][1:])
    written = trial["end_unix"] - single["start_unix"]  # process start until its outputs are on disk
    bound = single["imports_s"] + len(trial["epoch_s"]) * steady
    return {
        "imports_s": single["imports_s"],
            **{k: trial["phases"][k] for k in PHASES},
        "first_epoch_s": trial["epoch_s"][0],
        "steady_epoch_s": steady,
        "epochs_s": trial["phases"]["epochs_s"],
        "outputs_written_s": written,
        "process_exit_s": single["exit_s"],
        "target_denominator_s": bound,
        "ratio": written / bound,
        "test_accuracy": trial["test_accuracy"],
    }


def _packed(packed: dict[str, Any], single: dict[str, Any]) -> dict[str, Any]:
    """The packed trials, against the single run's steady epoch."""
    steady = single["steady_epoch_s"]
    beyond = [t["wall_time_s"] - steady for t in packed["trials"]]
    shared_startup = packed["imports_s"] / len(packed["trials"])
    return {
        "trials": len(packed["trials"]),
        "median_beyond_steady_epoch_s": statistics.median(beyond),
        "median_beyond_with_shared_startup_s": statistics.median(beyond) + shared_startup,
        "first_trial_beyond_s": beyond[0],
        "median_phases": {k: statistics.median(t["phases"][k] for t in packed["trials"]) for k in PHASES},
        "median_first_epoch_s": statistics.median(t["epoch_s"][0] for t in packed["trials"]),
        "imports_s": packed["imports_s"],
        "process_exit_s": packed["exit_s"],
    }


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Where a trial's time goes",
        "",
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} cores, Python {m['python']}, TensorFlow {m['tensorflow']}; "
        f"{m['date']}; load average {m['load_average_at_start'][0]:.1f} at the start (the machine is shared). "
        f"Real MNIST, default config (compiled loop, XLA), {results['repeats']} repeat(s), medians shown.",
        "",
        "| part | single 5-epoch run, s | packed one-epoch trial (median), s |",
        "|---|---|---|",
    ]
    s = results["summary"]["single"]
    p = results["summary"]["packed"]
    rows = [
        ("interpreter start and imports (TensorFlow, Keras, Hydra, mnist_hpc)", s["imports_s"],
         f"{p['imports_s']:.2f} once per task"),
        ("cache check and load", s["load_s"], p["median_phases"]["load_s"]),
        ("claim the run directory (identity, lease), write config", s["claim_s"], p["median_phases"]["claim_s"]),
        ("TensorFlow set-up, model build, engine", s["setup_s"], p["median_phases"]["setup_s"]),
        ("first epoch (tracing and XLA compilation included)", s["first_epoch_s"], p["median_first_epoch_s"]),
        ("one steady epoch (median of epochs 2-5)", s["steady_epoch_s"], "-"),
        ("evaluation: one prediction pass over the test set, test loss and accuracy from it", s["evaluate_s"],
         p["median_phases"]["evaluate_s"]),
        ("writing outputs (predictions, history, model, provenance)", s["write_s"], p["median_phases"]["write_s"]),
    ]
    for name, *values in rows:
        lines.append(f"| {name} | " + " | ".join(v if isinstance(v, str) else f"{v:.2f}" for v in values) + " |")
    lines += [
        "",
        f"Single run: process start to outputs written {s['outputs_written_s']:.2f} s (process exit "
        f"{s['process_exit_s']:.2f} s) against imports + 5 steady epochs = {s['target_denominator_s']:.2f} s: "
        f"**{s['ratio']:.2f}x** (target <= 1.5x). Test accuracy {s['test_accuracy']:.4f}.",
        "",
        f"Packed, {int(p['trials'])} one-epoch trials in one process: median time per trial beyond one steady epoch "
        f"**{p['median_beyond_steady_epoch_s']:.2f} s** (target <= 0.5 s); with the task's start-up shared among "
        f"its trials {p['median_beyond_with_shared_startup_s']:.2f} s; the first trial's {p['first_trial_beyond_s']:.2f} s.",
        "",
    ]
    q = results["summary"].get("search")
    if q:
        lines += [
            f"Search worker, {int(q['trials'])} one-epoch trials over the learning rate (10% validation split, 2 CPUs), "
            "medians over the trials after the first:",
            "",
            "| part | s |",
            "|---|---|",
            f"| submission to the first trial's start (Slurm, interpreter, imports, first ask) | {q['worker_start_s']:.2f} |",
            f"| the first trial, whole (its first trace and XLA compilation included) | {q['first_trial_wall_s']:.2f} |",
            f"| between two trials (tell, ask, compose and record the next) | {q['median_between_trials_s']:.2f} |",
            f"| cache check and load | {q['median_phases']['load_s']:.2f} |",
            f"| claim the run directory, write config | {q['median_phases']['claim_s']:.2f} |",
            f"| TensorFlow set-up, model build, engine | {q['median_phases']['setup_s']:.2f} |",
            f"| the epoch (training and validation) | {q['median_epoch_s']:.2f} |",
            f"| evaluation | {q['median_phases']['evaluate_s']:.2f} |",
            f"| writing outputs | {q['median_phases']['write_s']:.2f} |",
            "",
            f"A later trial takes {q['median_wall_s']:.2f} s, {q['median_beyond_epoch_s']:.2f} s beyond its epoch, plus "
            f"{q['median_between_trials_s']:.2f} s between trials.",
            "",
        ]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return 0
    from bench_training import machine_info, prefetch_cache, warm_up

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--packed", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--search", type=int, default=0, help="also one search worker's N trials (needs the cluster)")
    args = parser.parse_args()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-breakdown-") as tmp:
        cache = Path(tmp) / "cache"
        prefetch_cache(args.data.resolve(), cache)
        warm_up(args.data.resolve())
        summaries = []
        for i in range(args.repeats):
            single = run(cache, Path(tmp) / f"single-{i}", 1, 5)
            packed = run(cache, Path(tmp) / f"packed-{i}", args.packed, 1)
            summaries.append(summarise(single, packed))
            if args.search:
                summaries[-1]["search"] = summarise_search(run_search(cache, Path(tmp) / f"search-{i}", args.search))
            print(json.dumps(summaries[-1]), flush=True)
    summary = {part: {k: (statistics.median(s[part][k] for s in summaries) if isinstance(v, (int, float)) else v)
                      for k, v in summaries[0][part].items()} for part in ("single", "packed")}
    summary["packed"]["median_phases"] = {k: statistics.median(s["packed"]["median_phases"][k] for s in summaries)
                                          for k in PHASES}
    if args.search:
        summary["search"] = {k: statistics.median(s["search"][k] for s in summaries)
                             for k, v in summaries[0]["search"].items() if isinstance(v, (int, float))}
        summary["search"]["median_phases"] = {k: statistics.median(s["search"]["median_phases"][k] for s in summaries)
                                              for k in PHASES}
    results = {"machine": machine, "repeats": args.repeats, "runs": summaries, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "breakdown.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "breakdown.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
