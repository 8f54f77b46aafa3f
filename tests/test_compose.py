"""Fast composition equals Hydra's (issue 15): each override string parsed once (plain ones without
the grammar), typed values converted by the base's own nodes, the config a compute node rebuilds
from the launch file and its job's spec, and the batch write of job.json files."""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mnist_hpc import rundir
from mnist_hpc.config import flat_config, to_typed
from tests.helpers import REPO, composing


def typed_items(cfg: Any) -> list[tuple[str, str, str]]:
    """A typed config's keys with each value's type and repr: 1 and 1.0 and True must not pass as equal."""
    return [(k, type(v).__name__, repr(v)) for k, v in sorted(flat_config(cfg).items())]


# --- parsing ------------------------------------------------------------------------------------

KEYS = ["train.seed", "seed", "a.b_c.d", "a-b", "+a.b", "~a", "a@b", "a/b", "0.a", "a.0", "hydra.job.name"]
VALUES = [
    "0", "1", "-1", "+5", "1_000", "0123", "1__0", "1.", ".5", "0.", "-0", "-0.0", "+.5", "1e5", "1E-5", "1.5e+3",
    "1_0.5", "1.5_5", "5e", "1e5_0", "inf", "-inf", "+inf", "NaN", "Inf", "Infinity", "true", "TRUE", "False", "null",
    "NULL", "nullx", "truex", "relu", "e5", "_x-y", "a-", "x1.5", "-relu", "", "1 ", " 1", "1,2", "[1]", "${a}",
    "a b", "0x10", "'q'", "0.001", "1e-05", "3e-4", "adam", "compiled_loop",
]


def same_override(a: Any, b: Any) -> bool:
    va, vb = a._value, b._value
    same_value = type(va) is type(vb) and (repr(va) == repr(vb) or va == vb)
    return same_value and (a.type, a.key_or_group, a.value_type, a.package, a.input_line) == (
        b.type, b.key_or_group, b.value_type, b.package, b.input_line)


def test_plain_overrides_are_read_as_hydras_grammar_reads_them():
    """Every key=value pair of a wide sample: the fast reading, where it applies, equals Hydra's parse;
    the cache gives Hydra's result (or its error) for every string."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mnist_hpc.login.launcher.overrides import OverrideCache, fast_parse

    parser = OverridesParser.create()
    cache = OverrideCache()
    fast = 0
    for key, value in itertools.product(KEYS, VALUES):
        line = f"{key}={value}"
        try:
            [expected] = parser.parse_overrides([line])
        except Exception as exc:
            assert fast_parse(line) is None, line
            with pytest.raises(type(exc)) as raised:
                cache.parse([line])
            assert str(raised.value) == str(exc)
            continue
        quick = fast_parse(line)
        if quick is not None:
            fast += 1
            assert same_override(quick, expected), (line, quick, expected)
        [cached] = cache.parse([line])
        assert same_override(cached, expected), (line, cached, expected)
    # The common forms of a sweep's values do take the fast reading.
    assert fast > 150
    for line in ("train.seed=17", "optimizer.learning_rate=0.0003", "optimizer.learning_rate=1e-05",
                 "model.activation=gelu", "train.deterministic=true", "train.intra_op_threads=null"):
        assert fast_parse(line) is not None, line
    # Each distinct string is parsed once: the same object comes back.
    assert cache.parse(["train.seed=17"])[0] is cache.parse(["train.seed=17"])[0]
    assert math.isnan(fast_parse("x=nan")._value)


# --- typed configs --------------------------------------------------------------------------------

JOBS = [
    ["train.seed=5"], ["train.seed=0", "train.epochs=3", "train.batch_size=64"], ["optimizer.learning_rate=1"],
    ["optimizer.learning_rate=3e-4", "optimizer.momentum=0.5"], ["optimizer.name=adam"], ["optimizer=sgd", "train.seed=2"],
    ["train.execution=keras_fit"], ["train.deterministic=true"], ["train.deterministic=yes"], ["train.jit_compile=False"],
    ["train.intra_op_threads=2", "train.inter_op_threads=null"], ["train.checkpoint_every_batches=10"],
    ["model.activation=gelu"], ["model.hidden_units=[8,8]", "model.dropout=0.25"], ["data.filename=5"],
    ["data.filename=other.npz", "data.validation_split=0.1"], ['train.seed="3"'], ["train.epochs=${train.batch_size}"],
    ["experiment=sweep", "train.seed=7"], ["train=lesson", "train.seed=8"], ["+hydra.launcher.additional_parameters.hold=true", "train.seed=9"],
    ["train.seed=4", "train.seed=6"],
    # Refused by Hydra's composition (the same exception and message must come out) ...
    ["train.seed=abc"], ["train.seed=1.0"], ["train.epochs=null"], ["optimizer.name=ADAM"], ["train.execution=1"],
    ["~data.filename"], ["~train.checkpoint_every_batches"], ["~data.filename", "data.filename=x.npz"], ["train.nosuch=1"],
    # ... or by the schema and validate(), named in the refusal.
    ["model.dropout=1.5"], ["train.epochs=0"], ["optimizer.learning_rate=-1"], ["+model.extra=1"], ["model.activation=softmax"],
]


def outcome(fn: Any) -> tuple:
    try:
        return ("ok", typed_items(fn()))
    except Exception as exc:  # the error must be the same one
        return ("error", type(exc).__name__, str(exc).splitlines()[0])


def test_each_jobs_typed_config_equals_the_one_of_hydras_composition(tmp_path):
    """Values converted by the base's nodes, or the long way, give what to_typed(load_sweep_config(...))
    gives, with the same types; refusals raise the same error (composition) or carry it (schema)."""
    from mnist_hpc.login.launcher.compose import SweepComposer

    with composing(tmp_path, "train.seed=1,2") as (loader, master):
        composer = SweepComposer(loader, master)
        for job in JOBS:
            expected = outcome(lambda: to_typed(loader.load_sweep_config(master, list(job))))

            def planned() -> Any:
                plan = composer.plan(list(job))
                if plan.error is not None:
                    raise plan.error
                return plan.typed

            assert outcome(planned) == expected, job
            assert outcome(lambda: to_typed(composer.compose(list(job)))) == expected, job
        # Plain values took the short way (converted by the base's nodes), and came out as above.
        assert {"train.seed", "optimizer.learning_rate", "optimizer.name", "train.deterministic", "train.execution",
                "train.intra_op_threads", "model.activation", "data.filename"} <= set(composer._bases[()].converters)
        # One composition per choice of config groups: the defaults, optimizer=sgd, experiment=sweep,
        # train=lesson, +hydra..., +model.extra (the ~ ones fail to compose, as in Hydra).
        assert len(composer._bases) == 6


def test_a_job_changing_a_key_that_another_refers_to_is_typed_as_hydra_types_it(tmp_path):
    """A user's YAML may interpolate one key from another; a job that changes the one sees the other follow."""
    from mnist_hpc.login.launcher.compose import SweepComposer

    experiments = tmp_path / "user-conf" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "follow.yaml").write_text("# @package _global_\ntrain:\n  epochs: ${train.batch_size}\n")
    with composing(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'user-conf'}]", "train.seed=1,2") as (loader, master):
        composer = SweepComposer(loader, master)
        for job, epochs in ((["experiment=follow", "train.batch_size=7"], 7), (["experiment=follow", "train.seed=3"], 128)):
            expected = to_typed(loader.load_sweep_config(master, list(job)))
            plan = composer.plan(list(job))
            assert plan.error is None, plan.error
            assert typed_items(plan.typed) == typed_items(expected), job
            assert plan.typed.train.epochs == epochs
        # The key nothing refers to still took the short way.
        assert "train.seed" in composer._bases[("experiment=follow",)].converters


@pytest.mark.parametrize("key, interpolation, refers", [
    ("train.batch_size", "${train.batch_size}", True),
    ("train.seed", "${train}", True),  # the whole section
    ("train.seed", "${oc.dict.values:train}", True),
    ("train.seed", "${.seed}", True),  # relative
    ("train.seed", "${oc.env:SCRATCH,outputs}/mnist-hpc", False),  # the default output root: the fast path stays
    ("paths.output_root", "${oc.env:SCRATCH,outputs}/mnist-hpc", False),
    ("train.seed", "${oc.env:SCRATCH}/seeds", False),
    ("optimizer.name", "${hydra:job.name}", False),
])
def test_which_interpolations_send_a_job_the_long_way(key, interpolation, refers):
    from mnist_hpc.login.launcher.compose import _referred_to

    assert _referred_to(key, [interpolation]) is refers


# --- the compute node's rebuild -------------------------------------------------------------------

REBUILD = """
import json, pickle, sys
from omegaconf import OmegaConf
from mnist_hpc.compute.job import TrainJob
from mnist_hpc.config import flat_config, to_typed
out = []
for path in sys.argv[1:]:
    with open(path, "rb") as fh:
        job = TrainJob(pickle.load(fh))
    cfg = job.config()
    out.append({"container": OmegaConf.to_container(cfg, resolve=False, enum_to_str=True),
                "typed": [[k, type(v).__name__, repr(v)] for k, v in sorted(flat_config(to_typed(cfg)).items())],
                "subdir": str(cfg.hydra.sweep.subdir)})
print(json.dumps(out))
"""

SWEEPS = {
    "values": (["train.seed=1,2", "optimizer.learning_rate=1e-3,0.01"], None),
    "groups": (["optimizer=adam,sgd", "train.seed=3", "train=default,lesson"], None),
    "lists": (["model.hidden_units=[8],[16,16]", "model.activation=gelu,tanh"], None),
    "subdir named by overrides": (["hydra.sweep.subdir=${hydra.job.override_dirname}", "train.seed=5,6"], None),
    "+ and interpolations": (["train.seed=1"], [
        ["+hydra.launcher.additional_parameters.hold=true", "train.seed=4"],
        ["train.epochs=${train.batch_size}", "data.filename=x.npz", "model.hidden_units=[4]"],
        ["experiment=sweep", "train.seed=4", "train.seed=5"],
    ]),
}


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_the_config_a_compute_node_rebuilds_equals_hydras(tmp_path, sweep):
    """Login side: plan every job, write the launch file and each job as its pickle would hold it.
    A separate process (as on a node) rebuilds each config: it equals load_sweep_config's (with the
    job's number and the pinned sweep directory), and its typed values are those checked."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.singleton import Singleton
    from omegaconf import OmegaConf, open_dict

    from mnist_hpc.compute.run import train_task
    from mnist_hpc.contract.tasks import LaunchContext, TrainTrial
    from mnist_hpc.hydra_adapter import sweep_batches
    from mnist_hpc.login.launcher.compose import SweepComposer, plan_jobs

    cli, jobs = SWEEPS[sweep]
    sweep_dir = tmp_path / "sweep"
    with composing(tmp_path, *cli) as (loader, master):
        if jobs is None:
            parsed = OverridesParser.create().parse_overrides(list(master.hydra.overrides.task))
            [jobs] = sweep_batches(parsed, None)
        composer = SweepComposer(loader, master)
        planned = plan_jobs(composer, sweep_dir, jobs, 0)
        context = LaunchContext(tmp_path / "launch.pkl", object(), train_task, Singleton.get_state(), composer.bases(sweep_dir))
        context.save()
        pickles = []
        for job in planned:
            pickles.append(tmp_path / f"job{job.num}.pkl")
            pickles[-1].write_bytes(pickle.dumps(TrainTrial(LaunchContext(context.path), job.spec, job.run_dir)))
        expected = []
        for job in planned:
            cfg = loader.load_sweep_config(master, list(job.overrides))
            with open_dict(cfg):
                cfg.hydra.job.num, cfg.hydra.job.id, cfg.hydra.sweep.dir = job.num, f"train_{job.num}", str(sweep_dir)
            expected.append(json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))))
            assert typed_items(job.typed) == typed_items(to_typed(cfg))
            assert job.run_dir == sweep_dir / str(cfg.hydra.sweep.subdir)
    proc = subprocess.run([sys.executable, "-c", REBUILD, *map(str, pickles)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt = json.loads(proc.stdout)
    assert len(rebuilt) == len(planned) >= 2
    for job, want, got in zip(planned, expected, rebuilt):
        assert got["container"] == want, job.overrides
        assert [tuple(t) for t in got["typed"]] == typed_items(job.typed)
        assert sweep_dir / got["subdir"] == job.run_dir
    # What each job's pickle carries is its spec, not a config: a few hundred bytes.
    assert max(p.stat().st_size for p in pickles) < 1500 < context.path.stat().st_size


def test_a_config_that_resolves_otherwise_on_the_node_is_refused_with_failure_json(tmp_path, monkeypatch):
    """An ${oc.env:...} the node resolves to another value than the login node checked: the job
    refuses to run, naming the key and both values, in failure.json."""
    from hydra.core.singleton import Singleton

    from mnist_hpc.compute.job import TrainJob
    from mnist_hpc.compute.run import train_task
    from mnist_hpc.contract.jobconfig import ConfigMismatch
    from mnist_hpc.contract.tasks import LaunchContext, TrainTrial
    from mnist_hpc.login.launcher.compose import SweepComposer, plan_jobs

    monkeypatch.delenv("MNIST_HPC_TEST_FILE", raising=False)
    with composing(tmp_path, "train.seed=1,2") as (loader, master):
        composer = SweepComposer(loader, master)
        [job] = plan_jobs(composer, tmp_path / "s", [["data.filename=${oc.env:MNIST_HPC_TEST_FILE,mnist.npz}"]], 0)
        context = LaunchContext(tmp_path / "launch.pkl", object(), train_task, Singleton.get_state(), composer.bases(tmp_path / "s"))
        context.save()
    assert job.typed.data.filename == "mnist.npz"
    trial = TrainJob(pickle.loads(pickle.dumps(TrainTrial(LaunchContext(context.path), job.spec, job.run_dir))))
    ours = Singleton.get_state()  # the job installs the launch's Hydra state, as on a node
    try:
        assert trial.config().hydra.job.num == 0  # same environment: rebuilt and accepted
        monkeypatch.setenv("MNIST_HPC_TEST_FILE", "other.npz")
        with pytest.raises(ConfigMismatch, match=r"data.filename: 'mnist.npz' checked, 'other.npz' here"):
            trial()
    finally:
        Singleton.set_state(ours)
    error = rundir.read_failure(job.run_dir)
    assert "not the one checked on the login node" in error and "data.filename" in error


# --- writing many files -------------------------------------------------------------------------


def test_many_files_are_written_atomically_with_one_flush(tmp_path, monkeypatch):
    """All written with the umask's mode, each complete; the filesystem flushed twice (data, then
    renames) instead of an fsync per file; the per-file fsync is the fallback without syncfs."""
    from mnist_hpc import io

    flushes: list[Path] = []
    real_sync = io.sync_filesystem
    monkeypatch.setattr(io, "sync_filesystem", lambda d: flushes.append(d) or real_sync(d))
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / rundir.JOB_FILE).write_text("old")
    files = [(tmp_path / str(i) / rundir.JOB_FILE, f"record {i}".encode()) for i in range(5)]
    io.write_files_atomic(files)
    assert [p.read_bytes() for p, _ in files] == [data for _, data in files]
    mask = os.umask(0)
    os.umask(mask)
    assert {stat.S_IMODE(p.stat().st_mode) for p, _ in files} == {0o666 & ~mask}
    assert len(flushes) == 2 and not fsyncs
    assert not list(tmp_path.rglob(".*.tmp*"))

    monkeypatch.setattr(io, "sync_filesystem", lambda d: False)  # no syncfs here: an fsync per file and directory
    io.write_files_atomic([(p, b"again") for p, _ in files])
    assert [p.read_bytes() for p, _ in files] == [b"again"] * 5 and len(fsyncs) == 10


def test_a_failed_batch_write_changes_no_file_and_leaves_no_temporaries(tmp_path):
    from mnist_hpc.io import write_files_atomic

    (tmp_path / "0").mkdir()
    (tmp_path / "0" / rundir.JOB_FILE).write_text("old")
    (tmp_path / "blocker").write_text("a file where a directory should be")
    files = [(tmp_path / "0" / rundir.JOB_FILE, b"new"), (tmp_path / "1" / rundir.JOB_FILE, b"new"),
             (tmp_path / "blocker" / "2" / rundir.JOB_FILE, b"new")]
    with pytest.raises(OSError):
        write_files_atomic(files)
    assert (tmp_path / "0" / rundir.JOB_FILE).read_text() == "old"
    assert not (tmp_path / "1" / rundir.JOB_FILE).exists()
    assert not list(tmp_path.rglob(".*.tmp*"))


def test_liveness_of_many_jobs_is_read_from_one_squeue_listing():
    """squeue -r -o '%i|%A|%T' names an array task by 123_4 and, once it runs, by its own job id."""
    from mnist_hpc.slurm import parse_liveness

    text = (REPO / "tests" / "data" / "squeue_liveness.txt").read_text()
    ids = ["371_0", "371_2", "373", "371", "371_3", "374", "385", "390", "999", "371_9"]
    assert parse_liveness(text, ids) == {
        "371_0": True, "371_2": True, "373": True, "371": True, "371_3": False, "374": False, "385": False, "390": True,
        "999": False, "371_9": False,
    }


def test_a_batch_write_whose_temporary_vanished_writes_that_file_alone(tmp_path, monkeypatch):
    """A job that starts before the launcher's batch lands takes its lease and removes the directory's
    temporaries (a dead writer's, it must assume): that job.json is then written on its own."""
    from mnist_hpc import io

    files = [(tmp_path / str(i) / rundir.JOB_FILE, f"record {i}".encode()) for i in range(3)]
    real_sync = io.sync_filesystem

    def sync_and_claim(directory):
        # Between the writes and the renames: the claim's cleanup in run directory 1.
        rundir.remove_stale_temporaries(tmp_path / "1")
        return real_sync(directory)

    monkeypatch.setattr(io, "sync_filesystem", sync_and_claim)
    io.write_files_atomic(files)
    assert [p.read_bytes() for p, _ in files] == [data for _, data in files]
    assert not list(tmp_path.rglob(".*.tmp*"))
