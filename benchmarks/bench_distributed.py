"""One training on 1 worker with 2 CPUs against 2 workers with 1 CPU each, on this machine (issue 12).

Runs, interleaved, A B A B ... (``--pairs`` pairs), each in fresh Python processes, on the real
MNIST from a cache prefetched with ``mnist-hpc-prefetch --from``, 5 epochs of global batch 128:

- **A** one process, ``SLURM_CPUS_PER_TASK=2`` (TensorFlow's pools get 2 threads): the
  default single-process path (``train.distribution=auto`` resolves to ``none``);
- **B** two processes posing as the two tasks of one srun step (the Slurm variables srun sets,
  ``SLURM_CPUS_PER_TASK=1`` each): ``auto`` resolves to ``multi_worker``, one training across
  both, each worker computing half of every global batch and all-reducing the gradients.

Pair i runs both with ``train.seed=i-1``. For each run: epoch times (epoch 1 apart: it includes
tracing and compilation; the median uses epochs 2-5), samples/s and test accuracy. It also
measures the cost of one all-reduce of the model's gradients (407,050 float32, 1.63 MB) between
two workers here, which is what B pays per step on top of A's work, and writes
``distributed.md`` and ``distributed.json`` into ``--out``. No target: the machine has 2 cores,
so B can at best match A; the README's model says when scaling out pays on a real cluster.

    python benchmarks/bench_distributed.py --data ../shared/data/mnist.npz [--pairs 2]
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_training import ChildFailed, machine_info, prefetch_cache  # noqa: E402

TRAIN_SAMPLES = 60_000
PARAMS = 407_050
ALLREDUCE_REPS = 200


def slurm_env(rank: int, ntasks: int, job_id: int, cpus: int) -> dict[str, str]:
    """The variables srun gives task ``rank`` of an ``ntasks``-task step on this one node."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["SLURM_CPUS_PER_TASK"] = str(cpus)
    if ntasks > 1:
        env.update(SLURM_JOB_ID=str(job_id), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_STEP_NODELIST="localhost",
                   SLURM_STEP_TASKS_PER_NODE=str(ntasks), SLURMD_NODENAME="localhost")
    return env


def run_tasks(cmd: list[str], ntasks: int, cpus: int, job_id: int, timeout_s: float = 1800) -> list[dict[str, Any]]:
    """Start ``cmd`` as the ``ntasks`` tasks of one step; the JSON record each printed last."""
    procs = [subprocess.Popen(cmd, env=slurm_env(r, ntasks, job_id, cpus), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(ntasks)]
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0:
            raise ChildFailed(f"{' '.join(cmd[:3])} exited {proc.returncode}:\n{err[-3000:]}")
        records.append(json.loads(out.strip().splitlines()[-1]))
    return records


def run_training(cache: Path, work: Path, ntasks: int, cpus: int, seed: int, job_id: int) -> dict[str, Any]:
    run_dir = work / f"run-{ntasks}x{cpus}-{seed}"
    start = time.time()
    cmd = [sys.executable, str(HERE / "mnist_hpc_run.py"), str(cache), str(run_dir), f"train.seed={seed}"]
    chief = run_tasks(cmd, ntasks, cpus, job_id)[0]
    epochs = chief["epoch_seconds_reported"]
    later = epochs[1:] or epochs
    return {
        "workers": ntasks,
        "cpus_per_worker": cpus,
        "seed": seed,
        "epoch_seconds": epochs,
        "median_epoch_s": statistics.median(later),
        "samples_per_s": TRAIN_SAMPLES / statistics.median(later),
        "test_accuracy": chief["test_accuracy"],
        "wall_s": time.time() - start,
    }


def allreduce_probe(reps: int) -> None:
    """Worker side of the all-reduce measurement: sum a 1.63 MB float32 tensor ``reps`` times."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from mnist_hpc.compute.cluster import task_layout
    from mnist_hpc.compute.runtime import RuntimeInfo

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    layout = task_layout(RuntimeInfo.from_env())
    assert layout is not None
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": layout.addresses}), task_type="worker", task_id=layout.rank, rpc_layer="grpc")
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    value = tf.constant(np.ones(PARAMS, dtype=np.float32))

    @tf.function
    def reduce_n(n: Any) -> Any:
        def body(i: Any, acc: Any) -> Any:
            # (tf.identity: a value that enters the replica function untouched has no device to reduce to)
            out = strategy.run(lambda v: tf.distribute.get_replica_context().all_reduce("sum", tf.identity(v)), args=(acc,))
            return i + 1, strategy.experimental_local_results(out)[0] * 0.5
        return tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), value))[1]

    reduce_n(tf.constant(10))  # trace, connect, warm up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        reduce_n(tf.constant(reps))
        times.append((time.perf_counter() - start) / reps)
    print(json.dumps({"rank": layout.rank, "seconds_per_allreduce": statistics.median(times)}))


def markdown(result: dict[str, Any]) -> str:
    a = [r for r in result["runs"] if r["workers"] == 1]
    b = [r for r in result["runs"] if r["workers"] == 2]

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    ar = result["allreduce_ms"]
    lines = [
        "# Scaling out: 1 worker x 2 CPUs against 2 workers x 1 CPU (this machine)",
        "",
        f"Measured {result['when']} on {result['machine'].get('cpu_model', '?')} ({result['machine'].get('logical_cpus', '?')} CPUs), "
        f"load average {result['load_before']} before and {result['load_after']} after. Real MNIST, 5 epochs, "
        "global batch 128, default config; epoch 1 excluded from the medians (tracing, compilation).",
        "",
        "| figure | A: 1 worker, 2 CPUs | B: 2 workers, 1 CPU each |",
        "|---|---|---|",
        f"| median seconds per epoch (epochs 2-5) | {med(a, 'median_epoch_s'):.2f} | {med(b, 'median_epoch_s'):.2f} |",
        f"| samples/s | {med(a, 'samples_per_s'):,.0f} | {med(b, 'samples_per_s'):,.0f} |",
        f"| seconds per step (469 per epoch) | {med(a, 'median_epoch_s') / 469 * 1000:.2f} ms | "
        f"{med(b, 'median_epoch_s') / 469 * 1000:.2f} ms |",
        f"| test accuracy (mean of {len(a)}) | {statistics.mean(r['test_accuracy'] for r in a):.4f} | "
        f"{statistics.mean(r['test_accuracy'] for r in b):.4f} |",
        "",
        f"B/A epoch time per pair: {', '.join(f'{p:.2f}' for p in result['ratios'])} "
        f"(median {statistics.median(result['ratios']):.2f}x). Test accuracy difference per pair (B - A): "
        f"{', '.join(f'{d:+.4f}' for d in result['accuracy_differences'])}.",
        "",
        f"One all-reduce of the gradients (407,050 float32, 1.63 MB) between the two workers, ring over gRPC "
        f"on loopback: {ar:.2f} ms (median of 5 x {ALLREDUCE_REPS}). B pays one per step, on top of half of A's "
        "compute; on this 2-core machine the two workers and their gRPC threads also share the cores A had.",
        "",
        "Per run:",
        "",
        "| run | workers | seed | epoch seconds | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(result["runs"]):
        lines.append(f"| {i + 1} | {r['workers']} x {r['cpus_per_worker']} CPU | {r['seed']} | "
                     f"{', '.join(f'{s:.2f}' for s in r['epoch_seconds'])} | {r['test_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a real mnist.npz (the lesson's file)")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--allreduce-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allreduce_probe:
        allreduce_probe(ALLREDUCE_REPS)
        return 0
    job_ids = iter(range(70_000_000 + (os.getpid() % 1000) * 100, 80_000_000))
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        work = Path(tmp)
        cache = work / "cache"
        prefetch_cache(args.data, cache)
        load_before = os.getloadavg()[0]
        probe = [sys.executable, str(Path(__file__).resolve()), "--data", str(args.data), "--allreduce-probe"]
        allreduce_s = max(r["seconds_per_allreduce"] for r in run_tasks(probe, 2, 1, next(job_ids)))
        runs: list[dict[str, Any]] = []
        for i in range(args.pairs):
            for ntasks, cpus in ((1, 2), (2, 1)):
                print(f"pair {i + 1}: {ntasks} worker(s) x {cpus} CPU ...", file=sys.stderr, flush=True)
                runs.append(run_training(cache, work, ntasks, cpus, seed=i, job_id=next(job_ids)))
        load_after = os.getloadavg()[0]
    pairs = [(runs[2 * i], runs[2 * i + 1]) for i in range(args.pairs)]
    result = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "load_before": round(load_before, 2),
        "load_after": round(load_after, 2),
        "runs": runs,
        "ratios": [b["median_epoch_s"] / a["median_epoch_s"] for a, b in pairs],
        "accuracy_differences": [b["test_accuracy"] - a["test_accuracy"] for a, b in pairs],
        "allreduce_ms": allreduce_s * 1000,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "distributed.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
