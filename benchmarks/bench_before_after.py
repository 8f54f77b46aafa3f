"""Behaviour unchanged (issue 22, item 8): training, sweep and login benchmarks, before and after, in one run.

Two checkouts, both run by this Python (one venv) with PYTHONPATH pointing at the checkout
(``bench_login.tree_env``), which this script checks first: ``mnist_hpc`` and the Hydra plugin
must both come from the tree meant. Every measurement alternates the two checkouts (the order
flips every pair, so a drift in the shared machine's load falls on both), and each pair gives a
ratio after / before; medians and min-max are shown.

1. Training: each tree's own ``benchmarks/mnist_hpc_run.py CACHE_DIR RUN_DIR`` (the default
   config: 5 epochs, batch 128, rmsprop) on the real MNIST, one warm-up run per tree, then
   ``--train-pairs`` pairs: the whole process's wall time and CPU seconds, and the test accuracy.
   Each tree runs in a working directory of its own, so whatever its default config writes
   under ``./outputs`` (the earlier tree's compile cache) persists between its runs, as it
   would for a user.
2. Sweep: the lesson's 8 seeds at 1 epoch, 4 trials per task (``--sweep-layout``; auto packing
   follows the CPUs idle at submission, which other users change between turns), on the local
   cluster's partition ``--partition``, ``--sweep-pairs`` pairs: seconds from the submit command's start until the
   last trial's ``metrics.json``.
3. Login: the ``--large-trials``-trial held sweep (``bench_login.py``'s), ``--large-repeats``
   submissions per tree: seconds until every task is in ``squeue`` (target <= 1.5 s for after);
   and the 64-trial held sweep, after, before and (``--baseline-python``) hydra-submitit-launcher
   running after's app, ``--submit-repeats`` rounds.

    git worktree add --detach /tmp/pre22 18cf956
    python benchmarks/bench_before_after.py --data ../shared/data/mnist.npz --before-tree /tmp/pre22 \
        --baseline-python /tmp/hsl/bin/python

(the baseline's Python as in ``bench_login.py``). Needs the cluster. Writes before_after_22.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_login import baseline_python, job_ids, sweep_args, time_submission, tree_env, wait_done  # noqa: E402

TRAIN = "from mnist_hpc.cli import train_main; train_main()"
PREFETCH = "from mnist_hpc.cli import prefetch_main; prefetch_main()"
WHERE = (
    "import sys, mnist_hpc, hydra_plugins.mnist_hpc_launcher as p\n"
    "from hydra.core.plugins import Plugins\n"
    "from hydra.plugins.launcher import Launcher\n"
    "import inspect\n"
    "files = [mnist_hpc.__file__, *p.__path__, *(inspect.getfile(c) for c in Plugins.instance().discover(Launcher))]\n"
    "print('\\n'.join(f for f in files if '/hydra/_internal/' not in f))\n"
)
LOGIN_TARGET_S = 1.5


def check_tree(tree: Path) -> list[str]:
    """The files ``mnist_hpc`` and our launcher plugins are imported from under ``tree_env(tree)``; all in ``tree``."""
    proc = subprocess.run([sys.executable, "-c", WHERE], env=tree_env(tree), cwd="/", capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cannot import mnist_hpc from {tree}: {proc.stderr[-2000:]}")
    files = proc.stdout.split()
    stray = [f for f in files if not Path(f).resolve().is_relative_to(tree.resolve())]
    if stray:
        raise SystemExit(f"with PYTHONPATH={tree}, these come from elsewhere: {stray}")
    return files


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def pairs(n: int, trees: dict[str, Path], measure: Callable[[str, Path, int], dict[str, Any]]) -> dict[str, Any]:
    """``n`` pairs of ``measure``, the order flipped every pair; each side's runs and the per-pair ratios."""
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    labels = list(trees)
    for i in range(n):
        for label in labels if i % 2 == 0 else labels[::-1]:
            run = measure(label, trees[label], i)
            run["load_1min"] = os.getloadavg()[0]
            runs[label].append(run)
    return {"runs": runs}


def train_run(cache: dict[str, Path], work: Path) -> Callable[[str, Path, int], dict[str, Any]]:
    def measure(label: str, tree: Path, i: int) -> dict[str, Any]:
        cwd = work / f"train-{label}"
        cwd.mkdir(exist_ok=True)
        run_dir = cwd / f"run-{i}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "mnist_hpc_run.py"), str(cache[label]), str(run_dir)],
                              env=tree_env(tree), cwd=cwd, capture_output=True, text=True, timeout=1200)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"training ({label}) failed:\n{proc.stderr[-3000:]}")
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        shutil.rmtree(run_dir)
        print(f"  train {label} #{i}: {wall:.1f} s, test accuracy {record['test_accuracy']:.4f}", flush=True)
        return {
            "wall_s": wall,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "epochs_s": sum(record["epoch_seconds_reported"]),
            "epoch_s": record["epoch_seconds_reported"],
            "test_accuracy": record["test_accuracy"],
            "test_loss": record["test_loss"],
        }

    return measure


def sweep_run(cache: dict[str, Path], work: Path, partition: str, layout: list[str]) -> Callable[[str, Path, int], dict[str, Any]]:
    def measure(label: str, tree: Path, i: int) -> dict[str, Any]:
        sweep = work / f"sweep-{label}-{i}"
        start = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", TRAIN, *sweep_args(sweep, cache[label], work, "train.epochs=1", "train.seed=range(8)",
                                                      f"hydra.launcher.partition={partition}", *layout)],
            env=tree_env(tree), cwd=work, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"sweep submission ({label}) failed:\n{proc.stderr[-3000:]}")
        tasks = job_ids(sweep)
        wait_done(tasks, timeout_s=900)
        metrics = [sweep / str(t) / "metrics.json" for t in range(8)]
        wall = max(p.stat().st_mtime for p in metrics) - start
        accuracy = statistics.fmean(json.loads(p.read_text())["test_accuracy"] for p in metrics)
        packing = next((line for line in proc.stdout.splitlines() if line.startswith("packing")), "")
        print(f"  sweep {label} #{i}: {wall:.1f} s in {len(tasks)} task(s)", flush=True)
        shutil.rmtree(sweep, ignore_errors=True)
        return {"wall_s": wall, "tasks": len(tasks), "test_accuracy_mean": accuracy, "packing": packing}

    return measure


def held_run(cache: dict[str, Path], work: Path, trials: int) -> Callable[[str, Path, int], dict[str, Any]]:
    def measure(label: str, tree: Path, i: int) -> dict[str, Any]:
        sweep, name = work / f"held{trials}-{label}-{i}", f"ba{trials}-{label}-{i}"
        cmd = [sys.executable, "-c", TRAIN,
               *sweep_args(sweep, cache[label], work, f"train.seed=range({trials})",
                           "+hydra.launcher.additional_parameters.hold=true", "hydra.launcher.trials_per_task=1",
                           f"hydra.launcher.name={name}", mem_gb=1)]
        run = time_submission(cmd, name, sweep, tasks=trials, env=tree_env(tree), timeout_s=600)
        shutil.rmtree(sweep, ignore_errors=True)
        print(f"  {trials}-trial held sweep {label} #{i}: queued in {run['queued_s']:.2f} s", flush=True)
        return run

    return measure


def baseline_run(python: str, cache: Path, work: Path, i: int) -> dict[str, Any]:
    """hydra-submitit-launcher running after's app and the same 64-trial held sweep (it blocks: stopped once queued)."""
    sweep, name = work / f"base64-{i}", f"babase64-{i}"
    cmd = [python, "-c", TRAIN, "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=1", f"hydra.sweep.dir={sweep}", f"data.cache_dir={cache}", f"paths.output_root={work}",
           "train.seed=range(64)", "+hydra.launcher.additional_parameters.hold=true", f"hydra.launcher.name={name}"]
    run = time_submission(cmd, name, sweep, blocks=True, env=tree_env(REPO), timeout_s=300)
    shutil.rmtree(sweep, ignore_errors=True)
    print(f"  64-trial held sweep hydra-submitit-launcher #{i}: queued in {run['queued_s']:.2f} s", flush=True)
    return run


def summarise(result: dict[str, Any], key: str) -> None:
    """Medians and min-max of ``key`` per side, and the per-pair ratios after / before."""
    runs = result["runs"]
    for label, rs in runs.items():
        result[f"{label}_{key}"] = spread([r[key] for r in rs])
    if "before" in runs and "after" in runs:
        result[f"ratio_{key}"] = spread([a[key] / b[key] for a, b in zip(runs["after"], runs["before"])])


def table(result: dict[str, Any], key: str, unit: str, trees: dict[str, Path]) -> list[str]:
    lines = [f"| tree | runs | median {unit} | min {unit} | max {unit} |", "|---|---|---|---|---|"]
    for label in result["runs"]:
        s = result[f"{label}_{key}"]
        title = f"{label} (`{trees[label]}`)" if label in trees else label
        lines.append(f"| {title} | {len(result['runs'][label])} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} |")
    if f"ratio_{key}" in result:
        r = result[f"ratio_{key}"]
        lines += ["", f"After / before, pair by pair: median **{r['median']:.3f}x** (min {r['min']:.3f}, max {r['max']:.3f})."]
    return lines


def markdown(results: dict[str, Any]) -> str:
    """before_after_22.md from the results."""
    m, args = results["machine"], results["args"]
    trees = {label: Path(t["path"]) for label, t in results["trees"].items()}
    start, end = m["load_average_1_5_15_min"]["start"], m["load_average_1_5_15_min"]["end"]
    lines = [
        "# Issue 22, item 8: training, sweep and login benchmarks, before and after, in one run",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, local single-node Slurm (shared with other "
        f"sessions); {m['started']} to {m['ended']}. Load average (1, 5, 15 min): "
        f"{', '.join(f'{x:.2f}' for x in start)} at the start, {', '.join(f'{x:.2f}' for x in end)} at the end.",
        "",
        "Trees: " + "; ".join(f"{label} = `{t['path']}` at {t['commit']}" for label, t in results["trees"].items())
        + ". Both run by one venv with PYTHONPATH at the tree; `mnist_hpc` and the launcher plugin were checked to "
        "come from it. Every measurement alternates the trees, the order flipped every pair; ratios are after / "
        "before, pair by pair.",
    ]
    if "train" in results:
        t = results["train"]
        lines += [
            "", "## Training: the default 5-epoch run (`benchmarks/mnist_hpc_run.py CACHE_DIR RUN_DIR`, each tree's own)",
            "", f"One warm-up run per tree, then {args['train_pairs']} pairs. Whole-process wall seconds:", "",
            *table(t, "wall_s", "s", trees), "", "CPU seconds (user + system) of the process:", "",
            *table(t, "cpu_s", "s", trees), "", "Seconds in the 5 epochs (metrics.json's history):", "",
            *table(t, "epochs_s", "s", trees), "", "Test accuracy:", "",
        ]
        for label, rs in t["runs"].items():
            lines.append(f"- {label}: " + ", ".join(f"{r['test_accuracy']:.4f}" for r in rs))
    if "sweep" in results:
        s = results["sweep"]
        lines += [
            "", f"## Sweep: the lesson's 8 seeds at 1 epoch, partition `{args['partition']}`, "
            f"{' '.join(f'`{o}`' for o in args['sweep_layout']) or 'auto packing'}", "",
            f"{args['sweep_pairs']} pairs; seconds from the submit command's start until the last trial's metrics.json:",
            "", *table(s, "wall_s", "s", trees), "",
            "Tasks: " + "; ".join(f"{label} {sorted({r['tasks'] for r in rs})}" for label, rs in s["runs"].items())
            + ". Mean test accuracy of the 8 trials: "
            + "; ".join(f"{label} " + ", ".join(f"{r['test_accuracy_mean']:.4f}" for r in rs) for label, rs in s["runs"].items())
            + ".",
        ]
    if "large" in results:
        lg, s64 = results["large"], results["submit64"]
        after = lg["after_queued_s"]["median"]
        lines += [
            "", f"## Login: {args['large_trials']}-trial held sweep (`bench_login.py`'s)", "",
            f"{args['large_repeats']} submissions per tree; seconds from the command's start until all "
            f"{args['large_trials']} tasks are in `squeue`:", "", *table(lg, "queued_s", "s", trees), "",
            f"Target <= {LOGIN_TARGET_S} s for after: **{'met' if after <= LOGIN_TARGET_S else 'NOT met'}** "
            f"(median {after:.2f} s).", "", "Seconds until the command returned:", "", *table(lg, "returned_s", "s", trees),
            "", f"## Login: 64-trial held sweep, with hydra-submitit-launcher in the same run", "",
            f"{args['submit_repeats']} rounds (after, before, then hydra-submitit-launcher 1.2.0 running after's app, "
            "which blocks until its jobs end: stopped once all 64 tasks are queued); seconds until all 64 tasks are in "
            "`squeue`:", "", *table(s64, "queued_s", "s", trees),
        ]
    return "\n".join(lines) + "\n"


def git_head(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a local mnist.npz (e.g. ../shared/data/mnist.npz)")
    parser.add_argument("--before-tree", type=Path, required=True, help="a checkout of the code before (e.g. 18cf956)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--train-pairs", type=int, default=5)
    parser.add_argument("--sweep-pairs", type=int, default=3)
    parser.add_argument("--partition", default="one", help="Slurm partition of the real sweep")
    parser.add_argument("--sweep-layout", nargs="*", default=["hydra.launcher.trials_per_task=4"],
                        help="packing overrides of the real sweep; fixed by default, because auto packing follows the "
                        "CPUs idle at submission, which other users of a shared cluster change between the two trees' "
                        "turns (none: auto)")
    parser.add_argument("--large-trials", type=int, default=1000)
    parser.add_argument("--large-repeats", type=int, default=5, help="held large sweeps per tree")
    parser.add_argument("--submit-repeats", type=int, default=3, help="rounds of the 64-trial held sweep")
    parser.add_argument("--baseline-python", help="a Python with hydra-submitit-launcher (see bench_login.py)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "sweep", "login"])
    args = parser.parse_args()
    trees = {"before": args.before_tree.resolve(), "after": REPO}
    imported = {label: check_tree(tree) for label, tree in trees.items()}
    baseline = baseline_python(args.baseline_python)
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    work = Path(tempfile.mkdtemp(prefix="mnist-hpc-ba-"))
    cache = {label: work / f"cache-{label}" for label in trees}
    for label, tree in trees.items():
        subprocess.run([sys.executable, "-c", PREFETCH, "--from", str(args.data.resolve()), f"data.cache_dir={cache[label]}"],
                       env=tree_env(tree), cwd=work, check=True, capture_output=True)

    results: dict[str, Any] = {}
    if "train" not in args.skip:
        print("training: one warm-up run per tree ...", flush=True)
        measure = train_run(cache, work)
        results["train_warmup"] = {label: measure(label, tree, -1) for label, tree in trees.items()}
        print(f"training: {args.train_pairs} pairs ...", flush=True)
        results["train"] = pairs(args.train_pairs, trees, measure)
        for key in ("wall_s", "cpu_s", "epochs_s", "test_accuracy"):
            summarise(results["train"], key)
    if "sweep" not in args.skip:
        print(f"sweep: {args.sweep_pairs} pairs ...", flush=True)
        results["sweep"] = pairs(args.sweep_pairs, trees, sweep_run(cache, work, args.partition, args.sweep_layout))
        summarise(results["sweep"], "wall_s")
        summarise(results["sweep"], "test_accuracy_mean")
    if "login" not in args.skip:
        print(f"login: {args.large_trials}-trial held sweep, {args.large_repeats} per tree ...", flush=True)
        results["large"] = pairs(args.large_repeats, trees, held_run(cache, work, args.large_trials))
        summarise(results["large"], "queued_s")
        summarise(results["large"], "returned_s")
        print(f"login: 64-trial held sweep, {args.submit_repeats} rounds ...", flush=True)
        held64 = held_run(cache, work, 64)
        runs64: dict[str, list[dict[str, Any]]] = {"after": [], "before": [], "hydra-submitit-launcher": []}
        for i in range(args.submit_repeats):
            for label in ("after", "before") if i % 2 == 0 else ("before", "after"):
                runs64[label].append(held64(label, trees[label], i))
            if baseline:
                runs64["hydra-submitit-launcher"].append(baseline_run(baseline, cache["after"], work, i))
        results["submit64"] = {"runs": {k: v for k, v in runs64.items() if v}}
        summarise(results["submit64"], "queued_s")

    load_end = os.getloadavg()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    results["machine"] = {
        "cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0], "started": started,
        "ended": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average_1_5_15_min": {"start": load_start, "end": load_end},
    }
    results["trees"] = {label: {"path": str(tree), "commit": git_head(tree), "imported": imported[label]}
                        for label, tree in trees.items()}
    results["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "before_after_22.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "before_after_22.md").write_text(markdown(results))
    print(json.dumps({k: v for k, v in results.items() if k not in ("train", "sweep", "large", "submit64")}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
