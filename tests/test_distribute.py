"""One training across several tasks: the Slurm layout, the refusals, and the multi-worker runs
themselves (local processes posing as the tasks of one srun step; the cluster tests use srun)."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_hpc import rundir
from mnist_hpc.compute.cluster import (
    PORT_BASE,
    LayoutError,
    expand_hostlist,
    expand_tasks_per_node,
    job_port_block,
    resolve_distribution,
    task_layout,
)
from mnist_hpc.compute.runtime import RuntimeInfo
from mnist_hpc.config import ConfigError, Distribution, to_typed
from tests import local_workers
from tests.helpers import (
    TRAIN,
    checkpoint_positions,
    digests,
    fill_cache,
    finished_metrics,
    resume_line,
    run_json,
    strip_seconds,
    synthetic_mnist,
    tiny_overrides,
    weights,
)


def step(rank: int, ntasks: int, nodelist: str, tasks_per_node: str, node: str, job: str = "1234", **extra) -> RuntimeInfo:
    return RuntimeInfo(
        hostname="h", slurm_job_id=job, slurm_procid=rank, slurm_step_num_tasks=ntasks, slurm_step_nodelist=nodelist,
        slurm_step_tasks_per_node=tasks_per_node, slurmd_nodename=node, **extra,
    )


# --- Slurm's layout -----------------------------------------------------------------------------


def test_hostlists_expand_as_slurm_writes_them():
    assert expand_hostlist("vm") == ["vm"]
    assert expand_hostlist("localhost,vm") == ["localhost", "vm"]
    assert expand_hostlist("n[01-03,07]") == ["n01", "n02", "n03", "n07"]
    assert expand_hostlist("gpu[8-10],cpu1") == ["gpu8", "gpu9", "gpu10", "cpu1"]
    assert expand_hostlist("r[1-2]-ib[0,2]") == ["r1-ib0", "r1-ib2", "r2-ib0", "r2-ib2"]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]


@pytest.mark.parametrize("bad", ["", "n[1-", "n]1", "n[a-b]", "n[3-1]", "a,,b", "n[1-2]]"])
def test_malformed_hostlists_are_refused(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_hostlist_reader_only_ever_raises_valueerror():
    rng = random.Random(0)
    alphabet = "ab01-[],x()"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        for reader in (expand_hostlist, expand_tasks_per_node):
            try:
                reader(text)
            except ValueError:
                pass


def test_a_lone_process_or_a_one_task_step_has_no_layout():
    assert task_layout(RuntimeInfo(hostname="h")) is None
    # A batch script's own shell: Slurm sets SLURM_NTASKS there, but no step variables.
    assert task_layout(RuntimeInfo(hostname="h", slurm_job_id="5", slurm_procid=0)) is None
    assert task_layout(step(0, 1, "vm", "1", "vm")) is None


def test_ranks_fill_the_nodes_in_order_with_ports_from_the_job_id():
    layouts = [task_layout(step(r, 4, "n[1-2]", "2(x2)", f"n{1 + r // 2}", job="77")) for r in range(4)]
    assert [lay.rank for lay in layouts] == [0, 1, 2, 3]
    first = layouts[0]
    assert first.hosts == ("n1", "n1", "n2", "n2") and first.is_chief and not layouts[1].is_chief
    assert all(lay.addresses == first.addresses for lay in layouts)
    assert first.ports == tuple(job_port_block("77") + i for i in range(4))
    assert len(set(first.ports)) == 4 and all(PORT_BASE <= p <= 65535 for p in first.ports)
    # A requeued job keeps its id, hence its ports; the next job gets other ones.
    assert job_port_block("77") == job_port_block("77") != job_port_block("78")
    ports_77 = set(first.ports)
    ports_78 = set(task_layout(step(0, 4, "n[1-2]", "2(x2)", "n1", job="78")).ports)
    assert not ports_77 & ports_78


def test_cyclic_placement_deals_ranks_round_robin_and_large_jobs_reuse_ports_per_node():
    # srun's default with no more tasks than nodes is cyclic: one task per node, as block would.
    one_each = [task_layout(step(r, 2, "localhost,vm", "1(x2)", ["localhost", "vm"][r], slurm_distribution="cyclic"))
                for r in range(2)]
    assert one_each[0].hosts == one_each[1].hosts == ("localhost", "vm")
    dealt = task_layout(step(1, 4, "n[1-2]", "2(x2)", "n2", slurm_distribution="cyclic:block"))
    assert dealt.hosts == ("n1", "n2", "n1", "n2")
    big = task_layout(step(0, 16, "n[1-4]", "4(x4)", "n1", job="9"))
    base = job_port_block("9")
    assert big.ports == tuple(base + i for i in (0, 1, 2, 3) * 4)
    # Within each node, every task has its own port.
    for node in ("n1", "n2", "n3", "n4"):
        mine = [port for host, port in zip(big.hosts, big.ports) if host == node]
        assert len(set(mine)) == len(mine)


@pytest.mark.parametrize(
    "runtime, message",
    [
        (step(1, 2, "n[1-2]", "1(x2)", "n1"), "--distribution=block puts it on n2"),
        (step(1, 4, "n[1-2]", "2(x2)", "n1", slurm_distribution="cyclic"), "--distribution=cyclic puts it on n2"),
        (step(0, 2, "n[1-2]", "1(x2)", "n1", slurm_distribution="plane=2"), "--distribution=plane=2: where it puts"),
        (step(0, 3, "n[1-2]", "1(x2)", "n1"), "does not add up"),
        (step(0, 2, "n[1-", "2", "n1"), "cannot read Slurm's task layout"),
        (step(0, 9, "n1", "9", "n1"), "at most 8 per node"),
        (RuntimeInfo(hostname="h", slurm_step_num_tasks=2, slurm_procid=0), "run the training through srun"),
    ],
)
def test_inconsistent_layouts_are_refused_with_a_reason(runtime, message):
    with pytest.raises(LayoutError, match=re.escape(message)):
        task_layout(runtime)


def test_auto_trains_one_run_across_tasks_and_none_refuses_copies():
    two = task_layout(step(0, 2, "vm", "2", "vm"))
    assert resolve_distribution(Distribution.auto, None) is Distribution.none
    assert resolve_distribution(Distribution.auto, two) is Distribution.multi_worker
    assert resolve_distribution(Distribution.multi_worker, two) is Distribution.multi_worker
    with pytest.raises(LayoutError, match="2 independent copies into one run directory.*train.distribution=multi_worker"):
        resolve_distribution(Distribution.none, two)


def test_the_lessons_fit_cannot_be_distributed(compose):
    with pytest.raises(ConfigError, match="keras #20585"):
        to_typed(compose(["train=lesson", "train.distribution=multi_worker"]))
    assert to_typed(compose([])).train.distribution is Distribution.auto


# --- local multi-worker runs ----------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    cache_dir = tmp_path / "cache"
    fill_cache(cache_dir, synthetic_mnist(n_train=1200, n_test=200))
    return cache_dir


def overrides(cache: Path, tmp_path: Path, *extra: str) -> list[str]:
    return tiny_overrides(cache, tmp_path / "out") + [
        "train.epochs=3",
        "train.deterministic=true",
        "model.dropout=0.2",
        "data.validation_split=0.1",
        *extra,
    ]


def run_local(tmp_path: Path, name: str, args: list[str], ntasks: int = 2) -> tuple[list[int], list[str]]:
    logs = tmp_path / f"logs-{name}"
    codes = local_workers.wait_all(local_workers.start(local_workers.DRIVER + args, ntasks, tmp_path, logs))
    return codes, [(logs / f"task{r}.log").read_text() for r in range(ntasks)]


@pytest.mark.slow
def test_two_workers_train_one_run_equal_to_one_process(cache, tmp_path, compose):
    """Global batch 32 split 16 + 16 (and the 540-sample epoch's last 28 as 14 + 14): the same training
    as one process up to float rounding, both workers end with the same weights, the chief alone writes."""
    from mnist_hpc.compute.train import train_and_evaluate

    args = overrides(cache, tmp_path, "model.dropout=0.0")
    codes, logs = run_local(tmp_path, "two", [str(tmp_path / "two")] + args)
    assert codes == [0, 0], logs
    one = train_and_evaluate(to_typed(compose(args)), tmp_path / "one")

    run = tmp_path / "two"
    [chief_digest], [worker_digest] = digests(logs[0]), digests(logs[1])
    assert chief_digest == worker_digest  # each worker's own final weights
    metrics = finished_metrics(run)
    assert metrics["workers"] == 2 and [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    assert run_json(run, rundir.PROVENANCE_FILE)["distribution"]["workers"] == 2
    assert abs(metrics["test_accuracy"] - one["test_accuracy"]) < 0.01
    # Sums in another order: rounding, which RMSprop magnifies where gradients are near zero.
    for got, want in zip(weights(run), weights(tmp_path / "one")):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        assert np.abs(got - want).mean() <= 1e-4 * np.abs(want).mean()
    one_history = finished_metrics(tmp_path / "one")["history"]
    for got, want in zip(strip_seconds(metrics["history"]), strip_seconds(one_history)):
        assert got.keys() == want.keys()
        for key in got:
            assert got[key] == pytest.approx(want[key], abs=2e-4), key
    # Epoch lines and checkpoint files once: only the chief logs for people and writes.
    assert sum("epoch 1/3" in line for line in logs[0].splitlines()) == 1
    assert "epoch 1/3" not in logs[1] and not any(rundir.checkpoint_name(e, 0) in logs[1] for e in (1, 2, 3))
    assert sorted(p.name for p in (run / rundir.CHECKPOINT_DIR).iterdir()) == [rundir.checkpoint_name(2, 0), rundir.checkpoint_name(3, 0)]


@pytest.mark.slow
def test_a_batch_the_workers_do_not_divide_still_averages_over_the_global_batch(cache, tmp_path, compose):
    """33 rows for 2 workers: 17 + 16 and one padding row of weight 0; metrics count real rows only."""
    from mnist_hpc.compute.train import train_and_evaluate

    args = overrides(cache, tmp_path, "train.batch_size=33", "train.epochs=1", "model.dropout=0.0")
    codes, logs = run_local(tmp_path, "odd", [str(tmp_path / "odd")] + args)
    assert codes == [0, 0], logs
    one = train_and_evaluate(to_typed(compose(args)), tmp_path / "one")
    history = finished_metrics(tmp_path / "odd")["history"][0]
    one_history = finished_metrics(tmp_path / "one")["history"][0]
    # Accuracy is a count of rows: equal exactly unless a padding row were counted.
    assert history["accuracy"] == pytest.approx(one_history["accuracy"], abs=1e-6)
    assert history["loss"] == pytest.approx(one_history["loss"], rel=1e-4)
    assert one["test_accuracy"] == pytest.approx(finished_metrics(tmp_path / "odd")["test_accuracy"], abs=0.01)


@pytest.mark.slow
def test_usr2_mid_epoch_stops_both_workers_at_one_step_and_the_resume_is_bit_identical(cache, tmp_path):
    args = overrides(cache, tmp_path)
    codes, _ = run_local(tmp_path, "ref", [str(tmp_path / "ref")] + args)
    assert codes == [0, 0]
    run = tmp_path / "run"
    # 540 samples / 32 = 17 batches per epoch; USR2 after batch 6 (0-based 5) of the second epoch.
    codes, logs = run_local(tmp_path, "stop", [str(run), "--stop-at", "1", "5"] + args)
    assert codes == [128 + signal.SIGUSR2] * 2, logs
    # The same step boundary on both workers, and neither left before the chief's checkpoint was written.
    assert all("STOPPED 1 6 checkpoint-written=True" in log for log in logs), logs
    assert checkpoint_positions(run)[0] == (1, 6)
    assert not (run / rundir.METRICS_FILE).exists()
    assert rundir.read_progress(run).epochs_done == 1

    codes, logs = run_local(tmp_path, "resume", [str(run)] + args)
    assert codes == [0, 0], logs
    assert f"{resume_line(1, 6)}: 1 epoch(s) and 6 batch(es) done" in logs[0]
    metrics = finished_metrics(run)
    ref = finished_metrics(tmp_path / "ref")
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    assert strip_seconds(metrics["history"]) == strip_seconds(ref["history"])
    assert metrics["test_accuracy"] == ref["test_accuracy"]
    for got, want in zip(weights(run), weights(tmp_path / "ref")):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_a_killed_worker_ends_the_other_with_failure_json_naming_it(cache, tmp_path):
    run = tmp_path / "run"
    args = overrides(cache, tmp_path, "train.epochs=200", f"hydra.run.dir={run}")
    procs = local_workers.start(TRAIN + args, 2, tmp_path, tmp_path / "logs")
    deadline = time.time() + 300
    while not rundir.checkpoint_path(run, 2, 0).exists():
        assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "logs" / "task0.log").read_text()[-3000:]
        time.sleep(0.2)
    procs[1].kill()
    procs[1].wait()
    # The chief must notice the dead worker and end, not wait on it for ever: a bound on waiting
    # (generous for a loaded machine), which fails with the chief's log when it hangs.
    try:
        code = procs[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("the chief still ran 120 s after its worker was killed (it hangs):\n"
                    + (tmp_path / "logs" / "task0.log").read_text()[-3000:])
    assert code != 0
    assert "WorkerFailure: worker 1 of 2 (Slurm task 1 on node localhost) died, hung or became unreachable" in rundir.read_failure(run)
    assert not (run / rundir.METRICS_FILE).exists()


@pytest.mark.slow
def test_a_worker_that_never_joins_ends_the_chief_within_the_timeout(cache, tmp_path):
    run = tmp_path / "run"
    args = overrides(cache, tmp_path, "train.collective_timeout_s=15", f"hydra.run.dir={run}")
    [chief] = local_workers.start(TRAIN + args, 2, tmp_path, tmp_path / "logs", ranks=[0])
    code = chief.wait(timeout=300)
    assert code != 0
    assert "not all 2 workers joined within train.collective_timeout_s=15 s" in rundir.read_failure(run)


def test_independent_copies_are_refused_before_training(cache, tmp_path):
    run = tmp_path / "run"
    args = overrides(cache, tmp_path, "train.distribution=none", f"hydra.run.dir={run}")
    procs = local_workers.start(TRAIN + args, 2, tmp_path, tmp_path / "logs")
    assert local_workers.wait_all(procs, timeout=300) == [1, 1]
    log = (tmp_path / "logs" / "task0.log").read_text()
    assert "train.distribution=none: they would train 2 independent copies into one run directory" in log
    assert "Traceback" not in log
    assert not (run / rundir.CONFIG_FILE).exists() and not (run / rundir.CHECKPOINT_DIR).exists()


# --- the launcher: a multi-task job trains one run, or nothing is queued ----------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.distribution=none"], "train.distribution=none would train 2 independent copies into one run directory"),
        (["train=lesson"], "train.execution=keras_fit (train=lesson) cannot train across 2 tasks"),
        (["hydra.launcher.trials_per_task=2", "train.seed=1,2"], "their trials cannot be packed"),
        (["hydra.launcher.gpus_per_node=2"], "set hydra.launcher.gpu_request=gpus_per_task"),
    ],
)
def test_a_multi_task_job_that_would_not_train_one_run_is_refused(cache, tmp_path, extra, message):
    from tests.helpers import submit

    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}",
            *tiny_overrides(cache, tmp_path), *extra]
    proc = submit(args, tmp_path)
    assert proc.returncode != 0
    assert "nothing was queued" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (sweep / ".submitit").exists() or not any((sweep / ".submitit").iterdir())


def test_the_local_launcher_refuses_several_tasks(cache, tmp_path):
    from tests.helpers import submit

    sweep = tmp_path / "sweep"
    proc = submit(["-m", "hydra/launcher=local", "hydra.launcher.nodes=2", f"hydra.sweep.dir={sweep}",
                   *tiny_overrides(cache, tmp_path)], tmp_path)
    assert proc.returncode != 0
    assert "the local launcher starts one process per job; use hydra/launcher=slurm" in proc.stderr


@pytest.mark.slow
def test_two_workers_on_real_mnist_reach_the_single_workers_accuracy(tmp_path, compose):
    """The lesson's 5 epochs at global batch 128 (64 per worker): test accuracy within 0.005 of one process."""
    import sys

    from mnist_hpc.compute.train import train_and_evaluate
    from tests.helpers import IN_CI, SHARED_MNIST

    if not SHARED_MNIST.is_file():
        if IN_CI:
            pytest.fail(f"CI must have the real dataset at {SHARED_MNIST}")
        pytest.skip(f"real MNIST not at {SHARED_MNIST}")
    cache = tmp_path / "cache"
    pre = subprocess.run([sys.executable, "-c", "from mnist_hpc.cli import prefetch_main; prefetch_main()",
                          "--from", str(SHARED_MNIST), f"data.cache_dir={cache}"], capture_output=True, text=True, timeout=300)
    assert pre.returncode == 0, pre.stderr
    args = [f"data.cache_dir={cache}", f"paths.output_root={tmp_path / 'out'}"]
    codes, logs = run_local(tmp_path, "real", [str(tmp_path / "two")] + args)
    assert codes == [0, 0], logs[0][-3000:]
    one = train_and_evaluate(to_typed(compose(args)), tmp_path / "one")
    two = finished_metrics(tmp_path / "two")
    assert two["workers"] == 2 and two["epochs_completed"] == 5
    assert abs(two["test_accuracy"] - one["test_accuracy"]) <= 0.005, (two["test_accuracy"], one["test_accuracy"])
    assert two["test_accuracy"] >= 0.975


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"SLURM_JOB_ID": "101", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "1"}, "/s/.submitit/100/100_1_1_log.err"),
        ({"SLURM_JOB_ID": "101"}, "/s/.submitit/101/101_1_log.err"),
    ],
)
def test_a_workers_log_is_named_as_submitit_names_it_with_one_folder_per_array(env, expected):
    """The launcher's default folder is .submitit/%A: a failure must point at a file that exists there."""
    from mnist_hpc.compute.runtime import RuntimeInfo

    runtime = RuntimeInfo.from_env({**env, "SUBMITIT_FOLDER": "/s/.submitit/%A"})
    assert runtime.task_log(1) == expected
