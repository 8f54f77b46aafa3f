"""One trial, one directory, inside its sweep (I1); what status shows of a dead local job is true (I4);
a waiting launch fails, naming each trial that did not finish (I7).

The directory rule has one owner, :func:`mnist_hpc.claim.trial_dir_problems`, which the launcher's
preflight calls for both launchers before anything is queued; the "already finished" decision has
one too, :func:`mnist_hpc.claim.judge`, which a packed task now asks as the launcher and the
training do. Each is tested here on the paths it guards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from mnist_hpc import claim, rundir
from tests.helpers import REPORT, STATUS, TRAIN, hydra_trial_dir, run_to_files, tiny_overrides, until

LOCAL = ["-m", "hydra/launcher=local", "train.deterministic=true"]


# --- the rule itself, at its boundaries -----------------------------------------------------------


def test_each_trial_gets_its_own_directory_inside_the_sweep(tmp_path: Path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (sweep / "link").symlink_to(tmp_path / "elsewhere")
    assert claim.trial_dir_problems(sweep, [(0, sweep / "0"), (1, sweep / "1"), (2, sweep / "a" / "b")]) == []

    def problems(*dirs: Path) -> list[str]:
        return claim.trial_dir_problems(sweep, list(enumerate(dirs)))

    [same] = problems(sweep / "x", sweep / "x")
    assert "trials 0 and 1 would both write" in same and str(sweep / "x") in same
    [same] = problems(sweep / "x", sweep / "y" / ".." / "x")  # '..' resolved
    assert "trials 0 and 1" in same
    for outside in (sweep / ".." / "escaped_0", Path("/tmp/abs"), sweep / "link" / "0"):
        [escape] = problems(outside)
        assert "outside the sweep directory" in escape, outside
    [itself] = problems(sweep / ".")
    assert "would write the sweep directory" in itself and "itself" in itself
    for own in ("report", ".submitit", "workers", "multirun.yaml", ".hidden"):
        [reserved] = problems(sweep / own)
        assert "the sweep directory's own" in reserved, own
    [nested] = problems(sweep / "a", sweep / "a" / rundir.CHECKPOINT_DIR)
    assert "inside trial 0's directory" in nested
    # Every collision is named, not only the first.
    assert len(problems(sweep / "x", sweep / "x", sweep / "x")) == 2


# --- the launchers refuse before anything is queued -----------------------------------------------

CASES = {
    # The three reproductions.
    "subdir-by-lr": (["hydra.launcher.trials_per_task=2", "hydra.sweep.subdir=lr${optimizer.learning_rate}", "train.seed=0,1"],
                     "trials 0 and 1 would both write"),
    "same": (["hydra.launcher.trials_per_task=1", "hydra.sweep.subdir=same", "optimizer.learning_rate=1e-3,3e-4"],
             "trials 0 and 1 would both write"),
    "escape": (["hydra.sweep.subdir=../escaped_${hydra.job.num}", "train.seed=0,1"], "outside the sweep directory"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_local_launcher_refuses_colliding_or_escaping_trial_dirs(synthetic_cache: Path, tmp_path: Path, case: str):
    extra, message = CASES[case]
    sweep = tmp_path / "sweeps" / "s"
    proc = run_to_files([*TRAIN, *LOCAL, "hydra.launcher.wait=true", *tiny_overrides(synthetic_cache, tmp_path / "out"),
                f"hydra.sweep.dir={sweep}", *extra], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "nothing was queued" in proc.stderr and message in proc.stderr and "Traceback" not in proc.stderr
    # Nothing queued, nothing written: no job pickles, no job.json, no directory beside the sweep.
    assert not (sweep / ".submitit").exists()
    assert not list(sweep.rglob(rundir.JOB_FILE))
    assert sorted(p.name for p in (tmp_path / "sweeps").iterdir()) == ["s"]


@pytest.mark.slurm
def test_the_slurm_launcher_refuses_colliding_trial_dirs_before_queueing(synthetic_cache: Path, tmp_path: Path):
    from tests.helpers import slurm_launcher_args, submit

    sweep = tmp_path / "sweep"
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    args = slurm_launcher_args(sweep, *tiny_overrides(synthetic_cache, tmp_path), "hydra.sweep.subdir=same",
                               "optimizer.learning_rate=1e-3,3e-4")
    proc = submit(args, tmp_path)
    assert proc.returncode != 0 and "trials 0 and 1 would both write" in proc.stderr, proc.stderr[-2000:]
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before), "a job was queued"
    assert not (sweep / ".submitit").exists() and not list(sweep.rglob(rundir.JOB_FILE))


# --- a packed task skips only a trial that is finished with its own config -----------------------


@pytest.fixture
def hydra_state():
    """A job's config() installs its launch's Hydra singletons in this process: put ours back after."""
    from hydra.core.singleton import Singleton

    state = Singleton.get_state()
    yield
    Singleton.set_state(state)


@pytest.mark.slow
def test_a_packed_task_skips_a_finished_trial_only_when_the_directory_holds_its_config(synthetic_cache: Path,
                                                                                          tmp_path: Path, hydra_state):
    """The node's "already finished, skipping" asks claim.judge, as the launcher does: a directory that
    holds another config's finished run is not this trial's result, whatever its epochs."""
    from submitit.core.utils import DelayedSubmission

    sweep = tmp_path / "sweep"
    proc = run_to_files([*TRAIN, *LOCAL, "hydra.launcher.wait=true", "hydra.launcher.trials_per_task=2",
                *tiny_overrides(synthetic_cache, tmp_path / "out"), f"hydra.sweep.dir={sweep}", "train.seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [pickled] = list((sweep / ".submitit").rglob("*_submitted.pkl"))
    from mnist_hpc.compute.job import TrainJob

    packed = DelayedSubmission.load(pickled).function.load()
    first, second = (TrainJob(trial) for trial in packed.trials)
    assert first.finished() and second.finished()  # each holds its own finished run

    # Trial 1's directory now holds trial 0's run (as a race or a hand copy would leave it).
    for name in (rundir.IDENTITY_FILE, rundir.METRICS_FILE):
        shutil.copy(sweep / "0" / name, sweep / "1" / name)
    assert not second.finished()
    assert first.finished()
    # More epochs asked than done: not finished either (it continues).
    (sweep / "1" / rundir.IDENTITY_FILE).unlink()
    shutil.rmtree(sweep / "1")
    assert not second.finished()


# --- readers show a directory's numbers only beside the config that made them ---------------------


@pytest.mark.slow
def test_results_are_not_shown_for_a_job_queued_with_another_config(synthetic_cache: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    proc = run_to_files([*TRAIN, *LOCAL, "hydra.launcher.wait=true", *tiny_overrides(synthetic_cache, tmp_path / "out"),
                f"hydra.sweep.dir={sweep}", "train.seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [rundir.read_job(sweep / str(i)) for i in (0, 1)]
    identities = [rundir.read_identity(sweep / str(i)) for i in (0, 1)]
    metrics = [rundir.read_metrics(sweep / str(i)) for i in (0, 1)]
    # Each file names the config it is about, and they agree.
    assert [j.fingerprint for j in jobs] == [i["fingerprint"] for i in identities] == [m["fingerprint"] for m in metrics]
    assert jobs[0].fingerprint != jobs[1].fingerprint

    # Trial 1's job.json now describes trial 0's config (as an overwrite by a racing submission would).
    record = json.loads((sweep / "1" / rundir.JOB_FILE).read_text())
    record["fingerprint"], record["overrides"] = jobs[0].fingerprint, jobs[0].overrides
    (sweep / "1" / rundir.JOB_FILE).write_text(json.dumps(record))
    status = run_to_files([*STATUS, "--json", str(sweep)], tmp_path)
    assert status.returncode == 0 and "Traceback" not in status.stderr
    rows = {r["trial"]: r for r in json.loads(status.stdout)}
    assert rows[0]["last_epoch"] == 1 and rows[1]["last_epoch"] is None
    assert "was queued for another config" in status.stderr
    report = run_to_files([*REPORT, str(sweep)], tmp_path)
    assert report.returncode == 0, report.stderr
    with open(sweep / "report" / "report.csv") as fh:
        import csv

        rows = {int(r["trial"]): r for r in csv.DictReader(fh)}
    assert rows[1]["test_accuracy"] == "" and rows[1]["best"] != "yes"
    assert float(rows[0]["test_accuracy"]) == pytest.approx(metrics[0]["test_accuracy"])

    # A metrics.json from another config than the directory's is not shown either.
    (sweep / "1" / rundir.JOB_FILE).write_text(json.dumps({**record, "fingerprint": jobs[1].fingerprint}))
    shutil.copy(sweep / "0" / rundir.METRICS_FILE, sweep / "1" / rundir.METRICS_FILE)
    run_files = rundir.read_run(sweep / "1")
    assert run_files.metrics is None and any("comes from another config" in n for n in run_files.notes)


# --- a waiting launch says which trials did not finish, in one line each --------------------------


@pytest.mark.slow
def test_a_waiting_launch_names_a_damaged_checkpoint_in_one_line(synthetic_cache: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    base = [*TRAIN, *LOCAL, "hydra.launcher.wait=true", "hydra.launcher.trials_per_task=1",
            *tiny_overrides(synthetic_cache, tmp_path / "out"), f"hydra.sweep.dir={sweep}", "train.seed=0,1"]
    assert run_to_files(base, tmp_path).returncode == 0
    for ckpt in (sweep / "0" / rundir.CHECKPOINT_DIR).iterdir():
        ckpt.write_bytes(b"not a checkpoint")
    proc = run_to_files([*base, "train.epochs=2"], tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "RuntimeError" not in proc.stderr
    named = [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("trial ")]
    assert len(named) == 1 and named[0].startswith("trial 0 [train.seed=0]: FAILED: ") and "CheckpointError" in named[0]
    assert "1 of 2 trial(s) did not finish" in proc.stderr
    assert rundir.read_metrics(sweep / "1")["epochs_completed"] == 2


# --- a local job killed with kill -9 is shown as what it is ----------------------------------------


@pytest.mark.parametrize("victim", ["trainer", "controller"])
@pytest.mark.slow
def test_a_killed_local_job_is_shown_failed_with_its_last_epoch_and_can_be_resubmitted(synthetic_cache: Path,
                                                                                        tmp_path: Path, victim: str):
    """kill -9 of the process that trains (the pid in lease.json), or of submitit's controller process
    (the job's pid in job.json, whose task then stops at a step boundary): the job is over, and status
    says so with the epoch it reached, instead of RUNNING and PENDING forever."""
    sweep = tmp_path / "sweep"
    # Two trials packed into one process; long enough to be killed during trial 0.
    args = [*TRAIN, *LOCAL, "hydra.launcher.trials_per_task=2", *tiny_overrides(synthetic_cache, tmp_path / "out"),
            f"hydra.sweep.dir={sweep}", "train.seed=0,1", "train.epochs=400", "train.batch_size=8",
            "train.steps_per_execution=1"]
    proc = run_to_files(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = rundir.read_job(sweep / "0")
    assert record.cluster == "local" and record.host and record.pid_start
    until(lambda: (rundir.read_progress(sweep / "0") or rundir.Progress(0, 0)).epochs_done >= 1, "trial 0's first epoch")
    status = run_to_files([*STATUS, "--json", str(sweep)], tmp_path)
    assert [r["state"] for r in json.loads(status.stdout)] == ["RUNNING", "PENDING"]

    trainer = claim.lease_holder(rundir.read_lease(sweep / "0"))
    assert trainer.pid != int(record.job_id)
    os.kill(trainer.pid if victim == "trainer" else int(record.job_id), signal.SIGKILL)
    me = claim.Holder.this_process()
    until(lambda: claim.alive(claim.job_holder(record), me) is False and claim.alive(trainer, me) is False,
          "the job's processes to end")
    done = rundir.read_progress(sweep / "0").epochs_done
    status = run_to_files([*STATUS, "--json", str(sweep)], tmp_path)
    assert status.returncode == 0 and "Traceback" not in status.stderr
    rows = json.loads(status.stdout)
    assert [r["state"] for r in rows] == ["FAILED", "FAILED"]
    assert rows[0]["last_epoch"] == done and rows[0]["epochs"] == 400
    text = run_to_files([*STATUS, str(sweep)], tmp_path).stdout
    assert f"{done}/400" in text

    # The dead holder does not block a resubmission: trial 0 continues from its last checkpoint.
    again = run_to_files([*args[:-3], f"train.epochs={done + 1}", "train.batch_size=8", "hydra.launcher.wait=true"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert rundir.read_metrics(sweep / "0")["epochs_completed"] == done + 1
    assert "resuming from" in (sweep / "0" / rundir.LOG_FILE).read_text()
    assert rundir.read_metrics(sweep / "1")["epochs_completed"] == done + 1


@pytest.mark.parametrize("link", ["itself", "another sweep", "a system tree"])
def test_a_symbolic_link_in_a_sweep_never_adds_trials(tmp_path: Path, link: str) -> None:
    """Second hostile pass (I4): a link to "." listed each trial again and again, a link to another
    sweep showed its trials as this sweep's, a link to /usr walked that whole tree."""
    from mnist_hpc.login import trials

    sweep_dir = tmp_path / "sweep"
    for num in (0, 1):
        hydra_trial_dir(sweep_dir / str(num), [f"train.seed={num}"])
    target = {"itself": Path("."), "another sweep": tmp_path / "other", "a system tree": Path("/usr")}[link]
    if link == "another sweep":
        hydra_trial_dir(tmp_path / "other" / "0", ["train.seed=7"])
    (sweep_dir / "linked").symlink_to(target)
    assert trials.trial_dirs(sweep_dir) == [sweep_dir / "0", sweep_dir / "1"]


@pytest.mark.parametrize("name", ["٣0", "²0", "0٣"])
def test_a_trial_directory_named_with_other_digits_gets_no_number_from_them(tmp_path: Path, name: str) -> None:
    """Second hostile pass (I5): str.isdigit() took '٣0' for trial 30 and int('²0') raised."""
    from mnist_hpc.login import trials

    sweep_dir = tmp_path / "sweep"
    hydra_trial_dir(sweep_dir / name, ["train.seed=0"])
    [found] = trials.trial_dirs(sweep_dir)
    assert found.name == name and trials.read_trial(found).number is None
