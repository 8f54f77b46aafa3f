"""Login-node latency, sweep submission and sweep packing, measured on this machine's local Slurm cluster.

Issue 6, items 3 and 4, and issue 15:
- wall time (median over repeats, Python start-up included) of `mnist-hpc-prefetch` on a
  valid cache, `mnist-hpc-status`, `mnist-hpc-report` and `--help` of every command, and
  whether each imported TensorFlow;
- a 1,000-trial sweep (`train.seed='range(1000)'`, held jobs) queued by this checkout and by a
  checkout of main (`--main-tree`, run with PYTHONPATH pointing at it), interleaved, in the
  same run: seconds from the command's start until all 1,000 tasks are in `squeue`, when the
  command returned, and what it wrote under the sweep's `.submitit` folder; medians and
  main / this ratios;
- time to queue a 64-trial sweep (one job array) until every task is in `squeue`, over several
  submissions, side by side with hydra-submitit-launcher running the same sweep when
  `--baseline-python` names a Python that has it installed;
- an 8-trial sweep trained on the real MNIST, unpacked (8 tasks) against packed
  (`hydra.launcher.trials_per_task=4`, 2 tasks), wall time from submission to the last
  trial finished, in one run, as a ratio.

    git worktree add --detach /work/wt/old-main main
    python benchmarks/bench_login.py --data ../shared/data/mnist.npz --out benchmarks/results \
        --main-tree /work/wt/old-main --baseline-python /tmp/hsl/bin/python

where the baseline's Python is made with
`python -m venv --system-site-packages /tmp/hsl && /tmp/hsl/bin/pip install hydra-submitit-launcher==1.2.0`
(a separate environment, so its plugin does not join every Hydra start-up of the main one).
Every submission's held jobs are cancelled by their own array ids once counted.

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
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mnist_hpc.io import sha256_file, write_json_atomic, write_text_atomic  # noqa: E402

LIMIT_S = 1.0
COLD_REPORT = "mnist-hpc-report SWEEP, plots redrawn every run"
SUBMIT_LIMIT_S = 5.0
# Issues 22 and 23: a 1,000-trial held sweep queues in 1.5 s or less.
LARGE_SUBMIT_LIMIT_S = 1.5
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


def baseline_python(python: Optional[str]) -> Optional[str]:
    """A Python that has hydra-submitit-launcher installed (the baseline), or None to skip it."""
    if not python:
        return None
    probe = subprocess.run([python, "-c", "import hydra_plugins.hydra_submitit_launcher, mnist_hpc"], capture_output=True)
    if probe.returncode != 0:
        raise SystemExit(f"{python} cannot import hydra-submitit-launcher and mnist_hpc: {probe.stderr.decode()[-500:]}")
    return python


def queued_tasks(name: str) -> int:
    out = subprocess.run(["squeue", "-h", "-r", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout
    return len(out.split())


def cancel_own(name: str) -> None:
    """Cancel the arrays this benchmark queued under ``name``, by their own array ids."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-u", str(os.getuid()), "-o", "%F"], capture_output=True, text=True).stdout
    arrays = sorted(set(out.split()))
    if arrays:
        subprocess.run(["scancel", *arrays], check=False)


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of the files, bytes on disk with the directories: what `du` counts) under ``folder``."""
    written = disk = 0
    for path in [folder, *folder.rglob("*")] if folder.exists() else []:
        st = path.lstat()
        disk += st.st_blocks * 512
        written += st.st_size if path.is_file() else 0
    return written, disk


def time_submission(
    cmd: list[str], name: str, sweep: Path, blocks: bool = False, tasks: int = 64, timeout_s: float = 300,
    env: Optional[dict[str, str]] = None,
) -> dict[str, Any]:
    """Seconds from starting ``cmd`` until ``tasks`` tasks named ``name`` are in squeue.

    Also: when the command returned (a command that ``blocks`` until its jobs end is stopped
    once they are queued: None) and the bytes it wrote under the sweep's ``.submitit`` folder.
    The jobs are held, then cancelled.
    """
    start = time.perf_counter()
    # Run from the sweep's parent: `python -c` puts its working directory first on sys.path, and
    # the code under test must come from PYTHONPATH, not from wherever the benchmark was started.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=sweep.parent)
    queued_s = returned_s = None
    try:
        while time.perf_counter() - start < timeout_s:
            if returned_s is None and proc.poll() is not None:
                returned_s = time.perf_counter() - start
                if proc.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
            if queued_tasks(name) >= tasks:
                queued_s = time.perf_counter() - start
                break
            time.sleep(0.02)
        if queued_s is None:
            raise SystemExit(f"{tasks} tasks named {name} were not queued within {timeout_s:.0f} s")
        if returned_s is None and not blocks:
            if proc.wait(timeout=timeout_s) != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
            returned_s = time.perf_counter() - start
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        cancel_own(name)
    written, disk = folder_bytes(sweep / ".submitit")
    return {"queued_s": queued_s, "returned_s": returned_s, "submitit_bytes": written, "submitit_disk_bytes": disk}


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that makes Python import ``mnist_hpc`` (and the launcher plugin) from ``tree``."""
    return {**os.environ, "PYTHONPATH": str(tree)}


def large_sweep(trials: int, repeats: int, main_tree: Optional[Path], cache: Path, work: Path) -> dict[str, Any]:
    """The ``trials``-trial held sweep queued by this checkout and by main's, interleaved."""
    runs: dict[str, list[dict[str, Any]]] = {"this": [], "main": []}
    trees = {"this": REPO, **({"main": main_tree} if main_tree else {})}
    for i in range(repeats):
        for label, tree in trees.items():
            print(f"{trials}-trial submission {i + 1}/{repeats} ({label}) ...", flush=True)
            sweep, name = work / f"sweep{trials}-{label}-{i}", f"bench{trials}-{label}-{i}"
            cmd = [sys.executable, "-c", "from mnist_hpc.cli import train_main; train_main()",
                   *sweep_args(sweep, cache, work, f"train.seed=range({trials})", "+hydra.launcher.additional_parameters.hold=true",
                               "hydra.launcher.trials_per_task=1",
                               f"hydra.launcher.name={name}", mem_gb=1)]
            runs[label].append(time_submission(cmd, name, sweep, tasks=trials, env=tree_env(tree), timeout_s=600))
            shutil.rmtree(sweep, ignore_errors=True)

    def median(label: str, key: str) -> Optional[float]:
        return statistics.median(r[key] for r in runs[label]) if runs[label] else None

    out: dict[str, Any] = {"trials": trials, "runs": runs, "main_tree": str(main_tree) if main_tree else None,
                           "limit_s": LARGE_SUBMIT_LIMIT_S}
    for label in runs:
        for key in ("queued_s", "returned_s", "submitit_bytes", "submitit_disk_bytes"):
            out[f"{label}_median_{key}"] = median(label, key)
    if runs["main"]:
        for key in ("queued_s", "returned_s", "submitit_bytes", "submitit_disk_bytes"):
            out[f"main_over_this_{key}"] = out[f"main_median_{key}"] / out[f"this_median_{key}"]
    return out


def job_ids(sweep: Path) -> list[str]:
    return sorted({json.loads(p.read_text())["job_id"] for p in sweep.glob("*/job.json")})


def sweep_args(sweep: Path, cache: Path, work: Path, *extra: str, mem_gb: int = 3) -> list[str]:
    return [
        "-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", f"hydra.launcher.mem_gb={mem_gb}",
        f"hydra.sweep.dir={sweep}", f"data.cache_dir={cache}", f"paths.output_root={work}", *extra,
    ]


def large_sweep_lines(large: dict[str, Any]) -> list[str]:
    """login.md's table of the large held sweep, this checkout against main's."""
    n, runs = large["trials"], large["runs"]

    def row(label: str, title: str) -> str:
        r = runs[label]
        return (f"| {title} | {large[f'{label}_median_queued_s']:.2f} | {min(x['queued_s'] for x in r):.2f} | "
                f"{max(x['queued_s'] for x in r):.2f} | {large[f'{label}_median_returned_s']:.2f} | "
                f"{large[f'{label}_median_submitit_bytes']:,.0f} | {large[f'{label}_median_submitit_disk_bytes']:,.0f} |")

    lines = [
        "",
        f"{n}-trial sweep (`train.seed='range({n})'`, held jobs), {len(runs['this'])} submissions per checkout, "
        "interleaved: seconds from the command's start until all tasks are in `squeue` "
        f"(target <= {large['limit_s']:.1f} s), when the command returned, and its `.submitit` folder "
        "(bytes of the files; bytes on disk, directories included, as `du` counts them):",
        "",
        "| code | median s | min s | max s | command returned after s (median) | .submitit bytes | .submitit on disk |",
        "|---|---|---|---|---|---|---|",
        row("this", "this branch"),
    ]
    if runs["main"]:
        lines.append(row("main", f"main (`{large['main_tree']}`)"))
    verdict = "met" if large["this_median_queued_s"] <= large["limit_s"] else "NOT met"
    lines += ["", f"Target {verdict}: median {large['this_median_queued_s']:.2f} s."]
    if runs["main"]:
        lines[-1] += (
            f" main / this branch: {large['main_over_this_queued_s']:.2f}x until queued, "
            f"{large['main_over_this_returned_s']:.2f}x until the command returned, "
            f"{large['main_over_this_submitit_bytes']:.1f}x the .submitit bytes "
            f"({large['main_over_this_submitit_disk_bytes']:.1f}x on disk)."
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a local mnist.npz (e.g. ../shared/data/mnist.npz)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--trials", type=int, default=8, help="trials of the packing benchmark")
    parser.add_argument("--per-task", type=int, default=4, help="trials per task when packed")
    parser.add_argument("--submit-repeats", type=int, default=5, help="64-trial submissions to time")
    parser.add_argument(
        "--baseline-python",
        help="a Python with hydra-submitit-launcher installed (e.g. a venv made with "
        "--system-site-packages): times the same 64-trial sweep through it, side by side",
    )
    parser.add_argument("--main-tree", type=Path,
                        help="a checkout of main (git worktree add --detach /work/wt/old-main main): its 1,000-trial "
                        "submission is timed beside this checkout's")
    parser.add_argument("--large-trials", type=int, default=1000, help="trials of the large held sweep")
    parser.add_argument("--large-repeats", type=int, default=3, help="submissions of it per checkout")
    args = parser.parse_args()
    # Every command below runs this checkout's code (main's runs point PYTHONPATH at --main-tree).
    os.environ["PYTHONPATH"] = str(REPO)
    load_start = os.getloadavg()

    work = Path(tempfile.mkdtemp(prefix="mnist-hpc-bench-"))
    cache = work / "cache"
    train, prefetch, status, report = (console(f"mnist-hpc-{n}") for n in ("train", "prefetch", "status", "report"))
    subprocess.run([prefetch, "--from", str(args.data), f"data.cache_dir={cache}"], check=True, capture_output=True)
    cached_sha = sha256_file(cache / "mnist.npz")

    # The sweeps are measured first; their directories then serve status and report.
    print("8-trial sweep, unpacked ...", flush=True)
    common = ("train.epochs=1", f"train.seed=range({args.trials})", "data.validation_split=0.1")
    start = time.perf_counter()
    subprocess.run([train, *sweep_args(work / "unpacked", cache, work, *common, "hydra.launcher.trials_per_task=1")],
                   check=True, capture_output=True)
    unpacked_s = (time.perf_counter() - start) + wait_done(job_ids(work / "unpacked"))
    print(f"  {unpacked_s:.1f} s; packed ...", flush=True)
    start = time.perf_counter()
    subprocess.run([train, *sweep_args(work / "packed", cache, work, *common, f"hydra.launcher.trials_per_task={args.per_task}")],
                   check=True, capture_output=True)
    packed_s = (time.perf_counter() - start) + wait_done(job_ids(work / "packed"))
    print(f"  {packed_s:.1f} s", flush=True)

    large = large_sweep(args.large_trials, args.large_repeats, args.main_tree, cache, work)

    submit = {"ours": [], "baseline": []}
    baseline = baseline_python(args.baseline_python)
    for i in range(args.submit_repeats):
        print(f"64-trial submission {i + 1}/{args.submit_repeats} ...", flush=True)
        submit["ours"].append(time_submission(
            [train, *sweep_args(work / f"sweep64-{i}", cache, work, "train.seed=range(64)", "hydra.launcher.trials_per_task=1",
                                "+hydra.launcher.additional_parameters.hold=true", f"hydra.launcher.name=bench64-{i}")],
            f"bench64-{i}", work / f"sweep64-{i}"))
        if baseline:
            # hydra-submitit-launcher runs the same app and sweep; its launch() blocks until the
            # jobs end, so the clock stops when all 64 tasks are in squeue and the process is stopped.
            submit["baseline"].append(time_submission(
                [baseline, "-c", "from mnist_hpc.cli import train_main; train_main()",
                 "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3",
                 f"hydra.sweep.dir={work / f'base64-{i}'}", f"data.cache_dir={cache}", f"paths.output_root={work}",
                 "train.seed=range(64)", "+hydra.launcher.additional_parameters.hold=true",
                 f"hydra.launcher.name=base64-{i}"],
                f"base64-{i}", work / f"base64-{i}", blocks=True))

    sweep = str(work / "unpacked")
    commands = {
        "mnist-hpc-prefetch (valid cache)": ([prefetch, "--sha256", cached_sha, f"data.cache_dir={cache}"], "prefetch_main"),
        "mnist-hpc-status SWEEP": ([status, sweep], "status_main"),
        "mnist-hpc-report SWEEP": ([report, sweep, "--out", str(work / "report")], "report_main"),
        # Every run draws its plots anew (no target: the 1.0 s target is for the unchanged case).
        COLD_REPORT: (["sh", "-c", f'rm -rf "$1" && exec {report} {sweep} --out "$1"', "sh", str(work / "report-cold")],
                      "report_main"),
        "mnist-hpc-train --help": ([train, "--help"], "train_main"),
        "mnist-hpc-prefetch --help": ([prefetch, "--help"], "prefetch_main"),
        "mnist-hpc-status --help": ([status, "--help"], "status_main"),
        "mnist-hpc-report --help": ([report, "--help"], "report_main"),
    }
    latency = {}
    for label, (cmd, entry) in commands.items():
        print(f"timing {label} ...", flush=True)
        latency[label] = time_command(cmd, args.repeats)
        probe_args = cmd[1:] if cmd[0] != "sh" else [sweep, "--out", str(work / "report-probe")]
        latency[label]["imports_tensorflow"] = imports_tensorflow(entry, probe_args, work)

    results = {
        "machine": {
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_1_5_15_min": {"start": load_start, "end": os.getloadavg()},
        },
        "latency": latency,
        "submit_large": large,
        "submit_64": {
            "runs": submit,
            "median_queued_s": statistics.median(r["queued_s"] for r in submit["ours"]),
            "baseline_median_queued_s": (
                statistics.median(r["queued_s"] for r in submit["baseline"]) if submit["baseline"] else None
            ),
            "limit_s": SUBMIT_LIMIT_S,
        },
        "packing": {
            "trials": args.trials,
            "per_task": args.per_task,
            "unpacked_s": unpacked_s,
            "packed_s": packed_s,
            "speedup": unpacked_s / packed_s,
        },
    }
    lines = [
        "# Login-node latency, sweep submission and sweep packing",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, Python "
        f"{results['machine']['python']}, local single-node Slurm; {results['machine']['date']}; load average "
        f"(1 min) {load_start[0]:.1f} at the start, {results['machine']['load_average_1_5_15_min']['end'][0]:.1f} at "
        "the end (the machine is shared).",
        "",
        f"Median wall time over {args.repeats} runs, Python start-up included (target <= {LIMIT_S:.1f} s):",
        "",
        "| command | median s | min s | max s | imports TensorFlow | within target |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in latency.items():
        ok = r["median_s"] <= LIMIT_S and not r["imports_tensorflow"]
        verdict = ("yes" if ok else "NO") if label != COLD_REPORT else "no target"
        lines.append(f"| `{label}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
                     f"{'yes' if r['imports_tensorflow'] else 'no'} | {verdict} |")
    lines += large_sweep_lines(large)
    s64 = results["submit_64"]
    ours = s64["runs"]["ours"]
    lines += [
        "",
        f"64-trial sweep (`train.seed=range(64)`, held jobs), {len(ours)} submissions, seconds from the command's "
        f"start until all 64 tasks are in `squeue` (target <= {SUBMIT_LIMIT_S:.0f} s):",
        "",
        "| launcher | median s | min s | max s | command returned after s (median) | .submitit bytes |",
        "|---|---|---|---|---|---|",
        f"| mnist-hpc (`hydra/launcher=slurm`) | {s64['median_queued_s']:.2f} | "
        f"{min(r['queued_s'] for r in ours):.2f} | {max(r['queued_s'] for r in ours):.2f} | "
        f"{statistics.median(r['returned_s'] for r in ours):.2f} | {ours[0]['submitit_bytes']:,} |",
    ]
    base = s64["runs"]["baseline"]
    if base:
        lines.append(
            f"| hydra-submitit-launcher (`hydra/launcher=submitit_slurm`) | {s64['baseline_median_queued_s']:.2f} | "
            f"{min(r['queued_s'] for r in base):.2f} | {max(r['queued_s'] for r in base):.2f} | "
            "never (blocks until the jobs end) | "
            f"{base[0]['submitit_bytes']:,} |"
        )
    lines += [
        "",
        f"Target {'met' if s64['median_queued_s'] <= SUBMIT_LIMIT_S else 'NOT met'}: median "
        f"{s64['median_queued_s']:.2f} s."
        + (
            f" hydra-submitit-launcher / mnist-hpc: {s64['baseline_median_queued_s'] / s64['median_queued_s']:.2f}x "
            "(mnist-hpc also composes and type-checks every job and checks the data cache before it queues, "
            "and writes job.json per trial; hydra-submitit-launcher composes each job again on the node)."
            if base else " (no baseline run: pass --baseline-python)"
        ),
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
