"""trials_per_task: as asked, or chosen from the trials' estimated size and the free CPUs (auto)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from mnist_hpc import slurm
from mnist_hpc.claim import Verdict
from mnist_hpc.config import Config, ModelConfig, TrainConfig, flat_config
from mnist_hpc.login.launcher import packing
from mnist_hpc.login.launcher.options import typed


def conf(**changes):
    return typed(changes, "slurm", Path("/sweep"))


def job(num: int = 0, epochs: int = 5, hidden=(512,), samples: int = 60_000, done: int = 0):
    typed = Config(model=ModelConfig(hidden_units=list(hidden)), train=TrainConfig(epochs=epochs, seed=num))
    return SimpleNamespace(num=num, typed=typed, flat=flat_config(typed), train_samples=samples,
                           verdict=Verdict("continue", done) if done else None, run_dir=Path(f"/x/{num}"))


@pytest.mark.parametrize("value, expected", [("auto", None), ("AUTO", None), (1, 1), (4, 4), ("4", 4)])
def test_trials_per_task_is_auto_or_a_positive_number(value, expected):
    assert packing.requested(conf(trials_per_task=value)) == expected


@pytest.mark.parametrize("value", [0, -1, "two", "2.5", "", "1e3", True])
def test_other_trials_per_task_values_are_refused_with_what_to_write(value):
    with pytest.raises(packing.PackingError, match="use auto .* or a whole number >= 1"):
        packing.requested(conf(trials_per_task=value))


def test_the_default_is_auto():
    assert packing.requested(conf()) is None


@pytest.mark.parametrize("text, partition, idle", [
    ("debug*|0/4/0/4\n", None, 4),
    ("debug*|0/4/0/4\n", "debug", 4),
    ("cpu|10/54/0/64\ngpu*|4/4/0/8\n", None, 4),
    ("cpu|10/54/0/64\ngpu*|4/4/0/8\ncpu|0/6/0/6\n", "cpu", 60),
    ("cpu|10/54/0/64\n", "gpu", None),
    ("cpu|10/54/0/64\n", None, None),  # no default partition: unknown
    ("garbage\ncpu*|a/b/c/d\n", None, None),
    ("", None, None),
])
def test_idle_cpus_are_read_from_sinfo(text, partition, idle):
    assert slurm.parse_sinfo_cpus(text, partition) == idle


def test_the_lessons_trial_is_estimated_from_its_layers_samples_and_epochs():
    lesson = job()
    # 6 flops per weight per sample: 784x512 + 512x10 weights, 60,000 samples, 5 epochs.
    assert packing.trial_gflop(lesson) == pytest.approx(6 * (784 * 512 + 512 * 10) * 60_000 * 5 / 1e9)
    compute = packing.trial_gflop(lesson) / packing.GFLOPS_PER_CPU
    steps = 469 * 5
    assert packing.trial_seconds(lesson, 1) == pytest.approx(compute + steps * packing.STEP_S + packing.TRIAL_S)
    assert packing.trial_seconds(lesson, 2) == pytest.approx(compute / 2 + steps * packing.STEP_S + packing.TRIAL_S)
    assert packing.trial_gflop(job(done=3)) == pytest.approx(packing.trial_gflop(job()) * 2 / 5)
    assert packing.trial_gflop(job(hidden=(512, 512))) > packing.trial_gflop(job())


def auto(jobs, slots, **changes):
    original = packing.free_slots
    packing.free_slots = lambda c, cluster, qos=None: slots
    try:
        return packing.auto_trials_per_task(jobs, conf(**changes), "slurm")
    finally:
        packing.free_slots = original


def test_short_trials_are_packed_as_far_as_the_free_cpus_allow():
    short = [job(i, epochs=1, samples=6_000) for i in range(8)]
    assert auto(short, slots=2, cpus_per_task=1).per_task == 4  # two tasks side by side
    assert auto(short, slots=3, cpus_per_task=1).per_task == 3
    assert auto(short, slots=64, cpus_per_task=1).per_task == 1  # every trial can start now
    unknown = auto(short, slots=None, cpus_per_task=1)
    assert unknown.per_task == 8 and "free CPUs unknown" in unknown.reason


def test_trials_are_packed_only_until_a_task_is_worth_its_start_up():
    many = [job(i, epochs=1, samples=6_000) for i in range(1000)]
    seconds = packing.trial_seconds(many[0], 1)
    chosen = auto(many, slots=2, cpus_per_task=1)
    assert chosen.per_task * seconds >= packing.TASK_S > (chosen.per_task - 1) * seconds
    assert f"{chosen.per_task} trial(s) per task" in chosen.reason


def test_long_trials_single_trials_and_multi_task_jobs_are_not_packed():
    long = [job(i, epochs=50) for i in range(8)]
    assert packing.trial_seconds(long[0], 1) > packing.TASK_S
    assert auto(long, slots=1, cpus_per_task=1).per_task == 1
    assert auto([job(epochs=1, samples=600)], slots=1).per_task == 1
    short = [job(i, epochs=1, samples=600) for i in range(8)]
    assert auto(short, slots=1, tasks_per_node=2).per_task == 1


def test_a_packed_task_fits_in_half_its_time_limit():
    trials = [job(i, epochs=1, samples=30_000) for i in range(100)]
    seconds = packing.trial_seconds(trials[0], 1)
    chosen = auto(trials, slots=1, cpus_per_task=1, timeout_min=1)
    assert chosen.per_task == max(int(30 // seconds), 1)
    assert chosen.per_task * seconds <= 30


def test_free_slots_follow_the_idle_cpus_and_the_array_limit(monkeypatch):
    monkeypatch.setattr(slurm, "idle_cpus", lambda partition: {None: 10, "big": 100}[partition])
    assert packing.free_slots(conf(cpus_per_task=4), "slurm") == 2
    assert packing.free_slots(conf(cpus_per_task=1, partition="big", array_parallelism=16), "slurm") == 16
    assert packing.free_slots(conf(cpus_per_task=64), "slurm") == 1
    monkeypatch.setattr(slurm, "idle_cpus", lambda partition: None)
    assert packing.free_slots(conf(), "slurm") is None


def test_free_slots_stay_within_the_named_qos_group_allowance(monkeypatch):
    """hostile5 H9's unit: a QoS allowing 3 CPUs for all its jobs at once lets 1 two-CPU task start, whatever is idle."""
    monkeypatch.setattr(slurm, "idle_cpus", lambda partition: 10)
    grp = slurm.QosLimits("q", {}, {}, None, {"cpu": 3})
    assert packing.free_slots(conf(cpus_per_task=2), "slurm") == 5  # precondition: the idle CPUs alone
    assert packing.free_slots(conf(cpus_per_task=2), "slurm", grp) == 1
    assert packing.free_slots(conf(cpus_per_task=1), "slurm", grp) == 3
    assert packing.free_slots(conf(cpus_per_task=1), "slurm", slurm.QosLimits("q", {"cpu": 1}, {}, None)) == 10
    local = typed({"cpus_per_task": 1}, "local", Path("/sweep"))
    assert packing.free_slots(local, "local", grp) == packing.free_slots(local, "local")  # no QoS off Slurm


def test_the_local_launcher_counts_this_machines_cpus():
    import os

    def local(**changes):
        return typed(changes, "local", Path("/sweep"))

    cpus = len(os.sched_getaffinity(0))
    assert packing.free_slots(local(cpus_per_task=1), "local") == cpus
    assert packing.free_slots(local(cpus_per_task=cpus + 1), "local") == 1


def test_small_batches_and_small_networks_are_estimated_by_their_steps_and_trials():
    """A narrow network's trial is mostly per-step and per-trial cost, not arithmetic."""
    narrow = job(hidden=(16,), epochs=1)
    assert packing.trial_seconds(narrow, 1) > packing.TRIAL_S + 469 * packing.STEP_S
    one = job(epochs=5)
    one.typed.train.batch_size = 1
    assert packing.trial_seconds(one, 1) >= 60_000 * 5 * packing.STEP_S
    assert auto([job(i, hidden=(16,), epochs=1) for i in range(1000)], slots=None, cpus_per_task=1,
                timeout_min=10).per_task * packing.trial_seconds(narrow, 1) <= 300


def test_trials_of_the_same_shapes_are_packed_next_to_each_other():
    """Hydra varies the last override fastest: shapes alternate in the sweep's order, not in the tasks."""
    trials = [job(i, hidden=((256,), (512,))[i % 2], epochs=1, samples=600) for i in range(6)]
    groups = packing.pack(trials, 3)
    assert [[j.num for j in g] for g in groups] == [[0, 2, 4], [1, 3, 5]]
    assert [[j.num for j in g] for g in packing.pack(trials[:3], 3)] == [[0, 2, 1]]
    alike = [job(i, epochs=1, samples=600) for i in range(5)]  # seeds differ only: sweep order
    assert [[j.num for j in g] for g in packing.pack(alike, 2)] == [[0, 1], [2, 3], [4]]
