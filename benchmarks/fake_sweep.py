"""Trial directories (a job.json each) for existing Slurm jobs, as a launch leaves them: for
measuring ``mnist-hpc-status`` and ``mnist-hpc-report`` on large arrays without training.

    python benchmarks/fake_sweep.py SWEEP_DIR JOB_ID[,JOB_ID...] [--array N]

With ``--array N`` the one JOB_ID is an array and trials 0..N-1 are its tasks ``JOB_ID_i``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_hpc import rundir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep", type=Path)
    parser.add_argument("jobs")
    parser.add_argument("--array", type=int, default=0)
    args = parser.parse_args()
    ids = [f"{args.jobs}_{i}" for i in range(args.array)] if args.array else args.jobs.split(",")
    sweep = args.sweep.resolve()
    records = []
    for trial, job_id in enumerate(ids):
        (sweep / str(trial)).mkdir(parents=True, exist_ok=True)
        records.append(rundir.JobRecord.of("slurm", job_id, None, sweep / str(trial), [f"train.seed={trial}"], trial))
    rundir.write_jobs(records)


if __name__ == "__main__":
    main()
