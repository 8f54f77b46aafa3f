"""An 8-trial lesson sweep against the machine's compute bound, measured in the same run (issue 15).

The sweep a new user submits: the lesson's network and training (5 epochs, batch 128, rmsprop),
seeds 0-7, 1 CPU per task, on the real MNIST, through this machine's local Slurm cluster, with
the launcher's packing chosen three ways:

- ``trials_per_task=1``: one trial per task (8 tasks);
- ``trials_per_task=4``: four per task (2 tasks), as the issue measured it;
- ``auto``: the default, chosen from the trials' estimated size and the idle CPUs.

Each task traces and compiles its XLA program once.

Beside them, in the same rotation, the sweep's floor: the same 40 epochs as two Slurm tasks of
``floor_task.py`` (1 CPU each, as auto's two tasks), in which nothing of mnist-hpc runs: plain
TensorFlow, the lesson's step written by hand in one XLA loop, no Keras, metrics, evaluation or
outputs. Its wall time is what Slurm, Python, TensorFlow's import and the epochs alone cost on
this machine; no layout of this sweep can beat it by much, and a target below it cannot be met here.

Each layout is submitted ``--repeats`` times, layouts interleaved. Wall time runs from the submit
command's start until the last trial's ``metrics.json`` is written. The compute bound is the
sweep's 40 epochs at this machine's float32 GEMM rate at the training step's shapes on all its
cores (``bench_training.py --gemm``, measured in this run, before and after the sweeps): the
time the step's matmuls alone would take if every core did nothing else. Also shown: the sweep's
summed epoch seconds (what the trials spent in their epochs) and, as a second floor, those epoch
seconds spread over the machine's cores.

    python benchmarks/bench_sweep.py --data ../shared/data/mnist.npz [--repeats 2]

Needs the cluster (``slurm/cluster.sh start``). Writes sweep.md and sweep.json into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_login import console, job_ids, sweep_args, wait_done  # noqa: E402
from bench_training import compute_bound  # noqa: E402

TRIALS, EPOCHS = 8, 5
LAYOUTS = {
    "trials_per_task=1": ["hydra.launcher.trials_per_task=1"],
    "trials_per_task=4": ["hydra.launcher.trials_per_task=4"],
    "auto (default)": [],
}
TARGET = 1.3


def gemm() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(HERE / "bench_training.py"), "--gemm"], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"GEMM benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_sweep(train: str, sweep: Path, cache: Path, work: Path, extra: list[str], partition: str,
              trials: int = TRIALS) -> dict[str, Any]:
    load = os.getloadavg()[0]
    start = time.time()
    where = [f"hydra.launcher.partition={partition}"] if partition else []
    proc = subprocess.run([train, *sweep_args(sweep, cache, work, f"train.seed=range({trials})", *where, *extra)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"submission failed:\n{proc.stderr[-3000:]}")
    tasks = job_ids(sweep)
    wait_done(tasks)
    metrics = [sweep / str(i) / "metrics.json" for i in range(trials)]
    finished = max(p.stat().st_mtime for p in metrics)
    records = [json.loads(p.read_text()) for p in metrics]
    packing = next((line for line in proc.stdout.splitlines() if line.startswith("packing")), "")
    return {
        "wall_s": finished - start,
        "tasks": len(tasks),
        "epoch_s_sum": sum(row["seconds"] for r in records for row in r["history"]),
        "trial_wall_s_sum": sum(r["wall_time_s"] for r in records),
        "test_accuracy_mean": statistics.fmean(r["test_accuracy"] for r in records),
        "packing": packing,
        "load_average": load,
    }


FLOOR = "floor: plain TensorFlow, hand-written step (no mnist-hpc)"


def run_floor(data: Path, out: Path, partition: str) -> dict[str, Any]:
    """The sweep's floor: ``floor_task.py`` as an array of two 1-CPU tasks, 4 trials of 5 epochs each."""
    out.mkdir(parents=True)
    load = os.getloadavg()[0]
    where = [f"--partition={partition}"] if partition else []
    start = time.time()
    job = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", "--mem=2G", *where, "--job-name=floor",
         f"--output={out}/%a.log", "--wrap",
         f"srun {sys.executable} {HERE / 'floor_task.py'} --data {data} --trials {TRIALS // 2} --epochs {EPOCHS} "
         f"--out {out}/$SLURM_ARRAY_TASK_ID.json"],
        capture_output=True, text=True, timeout=120)
    if job.returncode != 0:
        raise SystemExit(f"sbatch of the floor failed: {job.stderr}")
    job_id = job.stdout.strip().split(";")[0]
    wait_done([f"{job_id}_0", f"{job_id}_1"])
    tasks = [json.loads((out / f"{i}.json").read_text()) for i in (0, 1)]
    return {
        "wall_s": max(t["ended"] for t in tasks) - start,
        "slurm_to_python_s": max(t["started"] for t in tasks) - start,
        "import_s": max(t["import_s"] for t in tasks),
        "data_s": max(t["data_s"] for t in tasks),
        "compile_s": max(t["compile_s"] for t in tasks),
        "epoch_s_sum": sum(sum(t["epoch_s"]) for t in tasks),
        "tasks": 2,
        "load_average": load,
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    bound = result["bound_s"]
    lines = [
        "# An 8-trial lesson sweep against the compute bound",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; local Slurm cluster, partition "
        f"`{result['partition'] or '(default)'}`; {m['date']}; {result['repeats']} repeat(s) per layout, interleaved, "
        "medians shown. Real MNIST; the lesson's network and training, 5 epochs, seeds 0-7, 1 CPU per task. "
        "(The local cluster's default partition has two node entries sharing this machine's 2 cores, so its idle "
        "CPUs count each core twice; partition `one` is the first node alone, 2 CPUs that are real cores.)",
        "",
        f"Compute bound, measured in this run: {TRIALS * EPOCHS} epochs x {result['bound']['gflop_per_epoch']:.1f} GFLOP "
        f"at {result['gflops']:.0f} GFLOP/s (GEMM rate at the step's shapes on {m['cores']} cores; "
        f"{', '.join(f'{g:.0f}' for g in result['gflops_runs'])} before and after the sweeps) = **{bound:.1f} s**.",
        "",
        "| layout | tasks | wall s, submit to last trial | wall / bound | epoch seconds summed | "
        f"epochs over {m['cores']} cores / bound | load avg at start |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in result["summary"].items():
        lines.append(
            f"| {name} | {s['tasks']} | {s['wall_s']:.1f} | **{s['ratio']:.2f}x** | "
            f"{s['epoch_s_sum']:.1f} | "
            f"{s['epoch_floor_ratio']:.2f}x | {s['load_average']:.1f} |"
        )
    floor = result.get("floor")
    if floor:
        lines.append(
            f"| {FLOOR} | 2 | {floor['wall_s']:.1f} | **{floor['ratio']:.2f}x** | {floor['epoch_s_sum']:.1f} | "
            f"{floor['epoch_floor_ratio']:.2f}x | {floor['load_average']:.1f} |"
        )
    best = min(result["summary"].items(), key=lambda kv: kv[1]["ratio"])
    auto = result["summary"]["auto (default)"]
    lines += [
        "",
        f"Target: wall at most {TARGET}x the bound. Best layout: {best[0]}, {best[1]['ratio']:.2f}x "
        f"({'met' if best[1]['ratio'] <= TARGET else 'not met'}); the default (auto) {auto['ratio']:.2f}x.",
        f"Auto chose: {auto['packing'] or '(no line printed)'}",
        "",
        "The last column is the floor the epochs themselves set: the trials' summed epoch seconds spread over the "
        "machine's cores, over the bound. A sweep cannot beat it without faster epochs; the gap between it and "
        "wall / bound is what surrounds the epochs (Slurm, start-up, compilation, evaluation, outputs).",
    ]
    if floor:
        verdict = ("so the target is below what this machine, Slurm and TensorFlow allow" if floor["ratio"]
                   > TARGET else "so the target is above the floor")
        lines += [
            "",
            f"The floor row: the same 40 epochs as two Slurm tasks (1 CPU each, as auto's) of `floor_task.py`, in which "
            "nothing of mnist-hpc runs: `sbatch --wrap 'srun python floor_task.py'`, plain `import tensorflow`, the npz "
            "read with numpy, the lesson's step (Dense 512 relu, Dense 10 softmax, cross-entropy, rmsprop) written by hand "
            "in one XLA loop, no Keras, metrics, evaluation or outputs. Medians, slowest task: sbatch to Python started "
            f"{floor['slurm_to_python_s']:.2f} s, `import tensorflow` {floor['import_s']:.2f} s, npz read "
            f"{floor['data_s']:.2f} s, XLA compilation {floor['compile_s']:.2f} s, epochs {floor['epoch_s_sum'] / 2:.1f} s "
            f"per task ({floor['epoch_s_sum'] / (TRIALS * EPOCHS):.2f} s per epoch, one thread, both cores busy). "
            f"The floor is **{floor['ratio']:.2f}x** the bound, {verdict}. "
            f"auto (default) takes {auto['wall_s'] / floor['wall_s']:.2f}x that floor.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--partition", default="one",
                        help="Slurm partition; the local cluster's 'one' is its first node alone, whose CPUs are this "
                        "machine's real cores (its default partition's two nodes share them); '' for the default")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = str(REPO)
    work = Path(tempfile.mkdtemp(prefix="mnist-hpc-sweep-bench-"))
    cache = work / "cache"
    train, prefetch = console("mnist-hpc-train"), console("mnist-hpc-prefetch")
    subprocess.run([prefetch, "--from", str(args.data), f"data.cache_dir={cache}"], check=True, capture_output=True)
    cores = len(os.sched_getaffinity(0))
    print("GEMM rates ...", flush=True)
    rates = [gemm()]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in LAYOUTS}
    floors: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for name, extra in LAYOUTS.items():
            tag = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
            run = run_sweep(train, work / f"{tag}-{repeat}", cache, work, extra, args.partition)
            runs[name].append(run)
            print(f"{name} #{repeat + 1}: {run['wall_s']:.1f} s in {run['tasks']} task(s)", flush=True)
        floors.append(run_floor(args.data.resolve(), work / f"floor-{repeat}", args.partition))
        print(f"floor #{repeat + 1}: {floors[-1]['wall_s']:.1f} s", flush=True)
    print("GEMM rates again ...", flush=True)
    rates.append(gemm())
    bounds = [compute_bound(r) for r in rates]
    gflops = statistics.fmean(b["step_shapes_gflops"] for b in bounds)
    bound = TRIALS * EPOCHS * bounds[0]["gflop_per_epoch"] / gflops
    summary = {}
    for name, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        epochs = statistics.median(r["epoch_s_sum"] for r in rs)
        summary[name] = {
            "tasks": rs[0]["tasks"], "wall_s": wall, "ratio": wall / bound, "epoch_s_sum": epochs,
            "epoch_floor_ratio": epochs / cores / bound, "load_average": statistics.median(r["load_average"] for r in rs),
            "packing": rs[0]["packing"],
            "test_accuracy_mean": statistics.fmean(r["test_accuracy_mean"] for r in rs),
        }
    floor = {key: statistics.median(f[key] for f in floors) for key in floors[0]}
    floor.update(ratio=floor["wall_s"] / bound, epoch_floor_ratio=floor["epoch_s_sum"] / cores / bound)
    result = {
        "floor": floor, "floor_runs": floors,
        "machine": {"cpu": _cpu(), "cores": cores, "python": platform.python_version(),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "repeats": args.repeats, "partition": args.partition, "bound": bounds[0], "gflops_runs": [b["step_shapes_gflops"] for b in bounds],
        "gflops": gflops, "bound_s": bound, "runs": runs, "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "sweep.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
