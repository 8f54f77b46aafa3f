"""Login-node latency and sweep packing, measured on this machine's local Slurm cluster.

Issue 6, items 3 and 4:
- wall time (median over repeats, Python start-up included) of `mnist-hpc-prefetch` on a
  valid cache, `mnist-hpc-status`, `mnist-hpc-report` and `--help` of every command, and
  whether each imported TensorFlow;
- time to queue a 64-trial sweep (one job array) until every task is in `squeue`;
- an 8-trial sweep trained on the real MNIST, unpacked (8 tasks) against packed
  (`hydra.launcher.trials_per_task=4`, 2 tasks), wall time from submission to the last
  trial finished, in one run, as a ratio.

    python benchmarks/bench_login.py --data ../shared/data/mnist.npz --out benchmarks/results

Needs the cluster (`slurm/cluster.sh start`). Writes login.md and login.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mnist_hpc.io import sha256_file, write_json_atomic, write_text_atomic  # noqa: E402

LIMIT_S = 1.0
SUBMIT_LIMIT_S = 5.0
TF_PROBE = (
    "import atexit, sys\n"
    "marker = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(marker, 'w').write(str('tensorflow' in sys.modules)))\n"
)


def console(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} is not on PATH: `pip install -e .` first")
    return path


def time_command(cmd: list[str], repeats: int) -> dict[str, Any]:
    """Median wall time of a command over ``repeats`` runs (after one warm-up run)."""
    subprocess.run(cmd, capture_output=True, timeout=120)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, timeout=120)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode()[-2000:]}")
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": repeats}


def imports_tensorflow(entry: str, args: list[str], workdir: Path) -> bool:
    """Run a console entry point in-process under a probe that records sys.modules at exit."""
    marker = workdir / f"tf-{time.monotonic_ns()}"
    code = TF_PROBE + f"from mnist_hpc.cli import {entry}; {entry}()"
    subprocess.run([sys.executable, "-c", code, str(marker), *args], capture_output=True, timeout=120)
    return marker.read_text() == "True"


def wait_done(job_ids: list[str], timeout_s: float = 1800) -> float:
    """Seconds until sacct shows every job in a terminal state."""
    terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                             capture_output=True, text=True).stdout
        states = {line.split("|")[0]: line.split("|")[1].split()[0] for line in out.splitlines() if "|" in line}
        if all(states.get(j) in terminal for j in job_ids):
            bad = {j: s for j, s in states.items() if s != "COMPLETED"}
            if bad:
                raise SystemExit(f"benchmark jobs did not complete: {bad}")
            return time.perf_counter() - start
        time.sleep(1)
    raise SystemExit("benchmark jobs did not finish in time")


def job_ids(sweep: Path) -> list[str]:
    return sorted({json.loads(p.read_text())["job_id"] for p in sweep.glob("*/job.json")})


def sweep_args(sweep: Path, cache: Path, work: Path, *extra: str) -> list[str]:
    return [
        "-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3",
        f"hydra.sweep.dir={sweep}", f"data.cache_dir={cache}", f"paths.output_root={work}", *extra,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a local mnist.npz (e.g. ../shared/data/mnist.npz)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--trials", type=int, default=8, help="trials of the packing benchmark")
    parser.add_argument("--per-task", type=int, default=4, help="trials per task when packed")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mnist-hpc-bench-"))
    cache = work / "cache"
    train, prefetch, status, report = (console(f"mnist-hpc-{n}") for n in ("train", "prefetch", "status", "report"))
    subprocess.run([prefetch, "--from", str(args.data), f"data.cache_dir={cache}"], check=True, capture_output=True)
    cached_sha = sha256_file(cache / "mnist.npz")

    # The sweeps are measured first; their directories then serve status and report.
    print("8-trial sweep, unpacked ...", flush=True)
    common = ("train.epochs=1", f"train.seed=range({args.trials})", "data.validation_split=0.1")
    start = time.perf_counter()
    subprocess.run([train, *sweep_args(work / "unpacked", cache, work, *common)], check=True, capture_output=True)
    unpacked_s = (time.perf_counter() - start) + wait_done(job_ids(work / "unpacked"))
    print(f"  {unpacked_s:.1f} s; packed ...", flush=True)
    start = time.perf_counter()
    subprocess.run([train, *sweep_args(work / "packed", cache, work, *common, f"hydra.launcher.trials_per_task={args.per_task}")],
                   check=True, capture_output=True)
    packed_s = (time.perf_counter() - start) + wait_done(job_ids(work / "packed"))
    print(f"  {packed_s:.1f} s", flush=True)

    print("64-trial submission ...", flush=True)
    before = time.perf_counter()
    subprocess.run([train, *sweep_args(work / "sweep64", cache, work, "train.seed=range(64)",
                                       "+hydra.launcher.additional_parameters.hold=true")], check=True, capture_output=True)
    submit_s = time.perf_counter() - before
    array = job_ids(work / "sweep64")[0].split("_")[0]
    queued = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i"], capture_output=True, text=True).stdout.split()
    subprocess.run(["scancel", array], check=True)

    sweep = str(work / "unpacked")
    commands = {
        "mnist-hpc-prefetch (valid cache)": ([prefetch, "--sha256", cached_sha, f"data.cache_dir={cache}"], "prefetch_main"),
        "mnist-hpc-status SWEEP": ([status, sweep], "status_main"),
        "mnist-hpc-report SWEEP": ([report, sweep, "--out", str(work / "report")], "report_main"),
        "mnist-hpc-train --help": ([train, "--help"], "train_main"),
        "mnist-hpc-prefetch --help": ([prefetch, "--help"], "prefetch_main"),
        "mnist-hpc-status --help": ([status, "--help"], "status_main"),
        "mnist-hpc-report --help": ([report, "--help"], "report_main"),
    }
    latency = {}
    for label, (cmd, entry) in commands.items():
        print(f"timing {label} ...", flush=True)
        latency[label] = time_command(cmd, args.repeats)
        latency[label]["imports_tensorflow"] = imports_tensorflow(entry, cmd[1:], work)

    results = {
        "machine": {
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "latency": latency,
        "submit_64": {"seconds": submit_s, "tasks_queued": len(queued), "limit_s": SUBMIT_LIMIT_S},
        "packing": {
            "trials": args.trials,
            "per_task": args.per_task,
            "unpacked_s": unpacked_s,
            "packed_s": packed_s,
            "speedup": unpacked_s / packed_s,
        },
    }
    lines = [
        "# Login-node latency and sweep packing",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, Python "
        f"{results['machine']['python']}, local single-node Slurm; {results['machine']['date']}.",
        "",
        f"Median wall time over {args.repeats} runs, Python start-up included (target <= {LIMIT_S:.1f} s):",
        "",
        "| command | median s | min s | max s | imports TensorFlow | within target |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in latency.items():
        ok = r["median_s"] <= LIMIT_S and not r["imports_tensorflow"]
        lines.append(f"| `{label}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
                     f"{'yes' if r['imports_tensorflow'] else 'no'} | {'yes' if ok else 'NO'} |")
    s64 = results["submit_64"]
    lines += [
        "",
        f"64-trial sweep submitted as one array: {s64['seconds']:.2f} s until the command returned with "
        f"{s64['tasks_queued']} tasks in `squeue` (target <= {SUBMIT_LIMIT_S:.0f} s: "
        f"{'met' if s64['seconds'] <= SUBMIT_LIMIT_S and s64['tasks_queued'] == 64 else 'NOT met'}).",
        "",
        f"{args.trials}-trial sweep on the real MNIST (1 epoch each, 1 CPU per task, 2-core node), "
        "submission to last trial finished:",
        "",
        "| layout | tasks | wall s |",
        "|---|---|---|",
        f"| unpacked | {args.trials} | {unpacked_s:.1f} |",
        f"| packed, {args.per_task} trials per task | {-(-args.trials // args.per_task)} | {packed_s:.1f} |",
        "",
        f"Packed is {results['packing']['speedup']:.2f}x faster (unpacked / packed).",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "login.json", results)
    write_text_atomic(args.out / "login.md", "\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
