"""Which trials of a sweep share a Slurm task (``hydra.launcher.trials_per_task``).

Trials packed into one task run one after another in one process: TensorFlow's import, the
data's inflation and (for trials of the same shapes) the compiled programs are paid once per
task instead of once per trial, and the results are the same as each trial's alone. Packing
costs parallelism, though: a task's trials do not run at the same time.

``trials_per_task=auto`` (the default) packs only what that trade favours, from an estimate
made of the configs before anything is queued (:func:`auto_trials_per_task`):

- enough trials per task that a task's start-up (:data:`STARTUP_S`) is about a tenth of its
  time (:data:`TASK_S`); a sweep whose longest trial is estimated at that or more is not packed;
- no more than the free CPUs allow to run at once: packing a sweep into fewer tasks than could
  run side by side would only make it slower (``sinfo``'s idle CPUs of the partition, or this
  machine's CPUs for the local launcher);
- no more than half the task's time limit, so that a packed task does not live off requeues.

Imported during Hydra's plugin discovery: light (no submitit, no TensorFlow).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from mnist_hpc import slurm
from mnist_hpc.config import traced_config
from mnist_hpc.dataset import NUM_CLASSES, PIXELS
from mnist_hpc.login.launcher.options import LocalQueueConf, SlurmQueueConf, tasks_per_job
from mnist_hpc.login.launcher.plan import PlannedJob

AUTO = "auto"
# What a task pays before its first trial trains: Slurm starting it, Python, TensorFlow's import,
# the data, the first trace and XLA compilation (about 5 s on a 2-core node; see the breakdown benchmark).
STARTUP_S = 6.0
# The least compute time worth a task of its own: start-up then costs at most ~10% of it.
TASK_S = 10 * STARTUP_S
# Sustained float32 training rate of one CPU core, in GFLOP/s, for the estimate. Deliberately
# low (a 2-core AMD EPYC node trains the lesson at about 100 per core): a trial is estimated too
# long rather than too short, which packs less rather than more.
GFLOPS_PER_CPU = 50.0
# What a trial costs beyond its arithmetic: each training step's dispatch and element-wise work
# (which small networks and small batches are made of), and per trial its set-up, evaluation,
# outputs and, when its shapes differ from the trial before it, its tracing and XLA compilation.
STEP_S = 50e-6
TRIAL_S = 2.0
# MNIST's training images, for a trial whose cache could not tell.
MNIST_TRAIN = 60_000


class PackingError(ValueError):
    """``hydra.launcher.trials_per_task`` is neither ``auto`` nor a positive whole number."""


@dataclass(frozen=True)
class Packing:
    """Trials per task, and why (printed with the submission when chosen automatically)."""

    per_task: int
    reason: str = ""


def process_settings(job: PlannedJob) -> tuple[Any, ...]:
    """TensorFlow settings that hold for a whole process: trials that differ in them cannot share one."""
    train = job.typed.train
    return (train.deterministic, train.intra_op_threads, train.inter_op_threads)


def pack(jobs: Sequence[PlannedJob], per_task: int) -> list[list[PlannedJob]]:
    """Trials grouped into tasks of at most ``per_task``, each task's trials alike in :func:`process_settings`.

    Within those, trials of the same shapes (:func:`mnist_hpc.config.traced_config`) come one
    after another, in the order the sweep first names each shape: a trial reuses the compiled
    programs of the trial before it in its process when their shapes are the same.
    """
    alike: dict[tuple[Any, ...], dict[str, list[PlannedJob]]] = {}
    for job in jobs:
        shapes = json.dumps(traced_config(job.flat), sort_keys=True, default=str)
        alike.setdefault(process_settings(job), {}).setdefault(shapes, []).append(job)
    groups = []
    for by_shapes in alike.values():
        members = [job for same in by_shapes.values() for job in same]
        groups += [members[i : i + per_task] for i in range(0, len(members), per_task)]
    return groups


def requested(conf: LocalQueueConf) -> Optional[int]:
    """``hydra.launcher.trials_per_task`` as asked: a positive number, or None for ``auto``.

    Raises:
        PackingError: anything else, with what to write instead.
    """
    raw = conf.trials_per_task
    text = str(raw).strip().lower()
    if text == AUTO:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text:
        raise PackingError(
            f"hydra.launcher.trials_per_task={raw!r}: use auto (packing chosen from the trials' size) or a whole "
            "number >= 1 (1: one trial per task)"
        )
    return value


def _remaining(job: PlannedJob) -> tuple[int, int]:
    """A trial's training images and the epochs it has left to train."""
    samples = job.train_samples if job.train_samples is not None else MNIST_TRAIN
    done = job.verdict.epochs_done if job.verdict is not None else 0
    return samples, max(job.typed.train.epochs - done, 0)


def trial_gflop(job: PlannedJob) -> float:
    """Floating-point work of a trial's remaining epochs: forward and backward through every Dense layer."""
    widths = [PIXELS, *job.typed.model.hidden_units, NUM_CLASSES]
    weights = sum(a * b for a, b in zip(widths, widths[1:]))
    samples, epochs = _remaining(job)
    return 6.0 * weights * samples * epochs / 1e9


def trial_seconds(job: PlannedJob, cpus_per_task: int) -> float:
    """Estimated time of a trial on ``cpus_per_task`` CPUs (not counting the task's start-up)."""
    samples, epochs = _remaining(job)
    steps = math.ceil(samples / job.typed.train.batch_size) * epochs
    return trial_gflop(job) / (GFLOPS_PER_CPU * max(cpus_per_task, 1)) + steps * STEP_S + TRIAL_S


def free_slots(conf: LocalQueueConf, cluster: str, qos: Optional[slurm.QosLimits] = None) -> Optional[int]:
    """Tasks of this shape that could start now: idle CPUs over CPUs per task, and on Slurm, for a
    task that asks for GPUs, no more than the idle GPUs let start, nor more than the group allowance
    of the QoS it names (``qos``: GrpTRES, which other jobs under it may be using) (None: unknown)."""
    cpus = max(conf.cpus_per_task, 1)
    slurm_conf = conf if isinstance(conf, SlurmQueueConf) else None
    if cluster == "slurm":
        idle = slurm.idle_cpus(slurm_conf.partition if slurm_conf else None)
    else:
        idle = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if idle is None:
        return None
    slots = max(idle // cpus, 1)
    if cluster == "slurm" and conf.gpus_per_node > 0:
        by_gpus = slurm.gpu_slots(conf.gpus_per_node, slurm_conf.partition if slurm_conf else None)
        slots = max(min(slots, by_gpus), 1) if by_gpus is not None else slots
    if cluster == "slurm" and qos is not None:
        for tres, each in (("cpu", cpus * tasks_per_job(conf)), ("gpu", conf.gpus_per_node * conf.nodes)):
            if tres in qos.per_group and each > 0:
                slots = max(min(slots, qos.per_group[tres] // each), 1)
    limit = slurm_conf.array_parallelism if slurm_conf else None
    return min(slots, limit) if limit else slots


def auto_trials_per_task(jobs: Sequence[PlannedJob], conf: LocalQueueConf, cluster: str,
                         qos: Optional[slurm.QosLimits] = None) -> Packing:
    """``trials_per_task=auto``: pack short trials, as far as the free CPUs and the time limit allow."""
    if len(jobs) <= 1 or tasks_per_job(conf) > 1:
        return Packing(1, "one trial per task (a single trial, or several tasks train each one)")
    cpus = max(conf.cpus_per_task, 1)
    # The longest trial sets the pace: a task of it alone must be worth its start-up.
    longest = max(trial_seconds(job, cpus) for job in jobs)
    if longest >= TASK_S:
        return Packing(1, f"one trial per task: trials are estimated at up to {longest:.0f} s each")
    for_startup = math.ceil(TASK_S / max(longest, 1e-3))
    slots = free_slots(conf, cluster, qos)
    for_parallelism = math.ceil(len(jobs) / slots) if slots else len(jobs)
    limit_s = float(conf.timeout_min) * 60
    for_limit = max(int(0.5 * limit_s // max(longest, 1e-3)), 1)
    per_task = max(min(for_startup, for_parallelism, for_limit, len(jobs)), 1)
    where = f"{slots} task(s) of {cpus} CPU(s) can start now" if slots else "free CPUs unknown"
    return Packing(
        per_task,
        f"{per_task} trial(s) per task: trials estimated at up to {longest:.1f} s each, a task's start-up at "
        f"~{STARTUP_S:.0f} s, {where} (set hydra.launcher.trials_per_task=N to choose)",
    )


def choose(jobs: Sequence[PlannedJob], conf: LocalQueueConf, cluster: str,
           qos: Optional[slurm.QosLimits] = None) -> Packing:
    """The packing of a launch: the number asked for, or the automatic one (``qos``: the limits of
    the QoS the launch names, as the site preflight read them)."""
    asked = requested(conf)
    if asked is not None:
        return Packing(asked)
    return auto_trials_per_task(jobs, conf, cluster, qos)
