"""Hostile pass 5 (hostile5): the changes of 2026-12-07 afternoon (b4edf7a..4d248d9) attacked as a
hostile user would: the local cluster's enforced associations and QoS, the site preflight's QoS
refusal (``site.qos_problem``, then ``qos_refusal``; ``slurm.parse_qos``, ``qos_limits``), and status's
reason words for QoS and association codes.

Each finding was a test marked ``xfail(strict=True, reason="hostile5 Hn: ...")`` that failed on
4d248d9 for the reason it names (each checked with ``--runxfail``): H1-H10, all fixed since, so the
markers are gone. The probes that held are listed in tests/HOSTILE.md ("Hostile pass 5").

The Slurm tests make their own throwaway QoS (``hostile5-*``, added to the account ``mnisthpc`` and
deleted afterwards) rather than rely on ``small``, whose limits and flags other work may change
while they run; their jobs never start (held, or pending on a limit) and are cancelled.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from mnist_hpc import slurm
from mnist_hpc.login.launcher.options import GpuRequest, SlurmQueueConf
from mnist_hpc.login.launcher.site import qos_problem, replaced_flags, request_of, sbatch_flags, sbatch_script
from tests.helpers import submit, tiny_overrides

ACCOUNT = "mnisthpc"  # root's default account on the local cluster (slurm/cluster.sh)


# --- helpers -------------------------------------------------------------------------------------


def rendered(conf: SlurmQueueConf) -> dict[str, str]:
    """The #SBATCH flags submitit renders for ``conf``, as the launch does."""
    import submitit

    from mnist_hpc.login.launcher.options import executor_init, submitit_parameters

    executor = submitit.AutoExecutor(folder="/scratch/u/sweep/.submitit/%A", cluster="slurm", **executor_init(conf, "slurm"))
    executor.update_parameters(**submitit_parameters(conf, "slurm"))
    return sbatch_flags(sbatch_script(executor))


def problem_of(conf: SlurmQueueConf, qos: slurm.QosLimits) -> str | None:
    return qos_problem(request_of(rendered(conf), conf), qos)


# The refusal's last clause: the settings that fit, ``hydra.launcher.X=V [hydra.launcher.Y=W ...] fit(s)``.
FIT = re.compile(r"; ((?:hydra\.launcher\.[\w.]+=\S+ )+)fits?$")


def follow(conf: SlurmQueueConf, problem: str) -> SlurmQueueConf:
    """``conf`` with the values the refusal says fit."""
    match = FIT.search(problem)
    assert match, f"no value that fits in: {problem}"
    for part in match.group(1).split():
        setting, _, value = part.partition("=")
        key = setting.removeprefix("hydra.launcher.")
        if key.startswith("additional_parameters."):
            conf = replace(conf, additional_parameters={**conf.additional_parameters, key.partition(".")[2]: value})
            continue
        old = getattr(conf, key)
        conf = replace(conf, **{key: type(old)(float(value)) if isinstance(old, (int, float)) else value})
    return conf


def own_preflight_refusal(conf: SlurmQueueConf) -> str | None:
    """What the launch's own option checks (before the site) say of ``conf``, or None."""
    from mnist_hpc.login.launcher.plan import PreflightError
    from mnist_hpc.login.launcher.preflight import check_slurm_options

    try:
        check_slurm_options(conf)
    except PreflightError as error:
        return str(error)
    return replaced_flags(conf)


def conf_of(**kw: Any) -> SlurmQueueConf:
    return SlurmQueueConf(**{"cpus_per_task": 1, "mem_gb": 1, "timeout_min": 5, "qos": "q", **kw})


# --- H1: a QoS MaxWall of 2 minutes or less: "timeout_min=N fits", then our own preflight refuses it ---


@pytest.mark.parametrize("max_wall", [1, 2])
def test_the_time_that_fits_a_qos_is_one_the_launcher_itself_accepts(max_wall: int) -> None:
    qos = slurm.QosLimits("q", {}, {}, max_wall)
    conf = conf_of(timeout_min=60)  # signal_delay_s: the default 120
    problem = problem_of(conf, qos)
    assert problem is not None  # precondition: 60 minutes is over the QoS's MaxWall
    if FIT.search(problem) is None:
        return  # no value named (another QoS, say): nothing to follow
    followed = follow(conf, problem)
    assert problem_of(followed, qos) is None  # precondition: the QoS takes it
    assert own_preflight_refusal(followed) is None, (
        f"the refusal said: {problem}\nwith that value the launcher itself says: {own_preflight_refusal(followed)}")


# --- H2: several limits of the QoS over: the value that "fits" is refused by the next ---------------


def test_the_value_that_fits_a_qos_is_accepted_by_that_qos() -> None:
    small = slurm.QosLimits("small", {"cpu": 1, "mem": 1024}, {}, 5)  # slurm/cluster.sh's QoS small
    conf = SlurmQueueConf(qos="small")  # the defaults: 2 CPUs, 4 GB, 60 minutes
    problem = problem_of(conf, small)
    assert problem is not None and re.search(r"fits?$", problem), problem
    followed = follow(conf, problem)
    assert problem_of(followed, small) is None, (
        f"the refusal said: {problem}\nwith that value the same QoS refuses: {problem_of(followed, small)}")


# --- H3: GPUs asked through additional_parameters.gres: the fit names gpus_per_node -------------------


def test_a_qos_gpu_refusal_names_the_setting_that_asked_for_the_gpus() -> None:
    qos = slurm.QosLimits("q", {"gpu": 1}, {}, None)
    conf = conf_of(additional_parameters={"gres": "gpu:2"})
    problem = problem_of(conf, qos)
    assert problem is not None and "2 GPU(s)" in problem  # precondition: the two GPUs are seen
    # The partition's check names it (tests/test_site_preflight.py::test_gpus_and_a_partitions_caps).
    assert "hydra.launcher.additional_parameters.gres" in problem, problem
    # Following the advice as given leaves --gres=gpu:2 in the script beside --gpus-per-node=1.
    followed = follow(conf, problem)
    assert rendered(followed).get("gres") != "gpu:2", rendered(followed)


# --- H4: gpu_request=gpus_per_task with 2 tasks per node: "gpus_per_node=1 fits" renders 2 GPUs ----


def test_a_qos_gpu_fit_holds_for_each_gpu_spelling() -> None:
    qos = slurm.QosLimits("q", {"gpu": 1}, {}, None)
    conf = conf_of(gpus_per_node=2, tasks_per_node=2, gpu_request=GpuRequest.gpus_per_task)
    problem = problem_of(conf, qos)
    assert problem is not None  # precondition: 2 GPUs against a limit of 1
    if FIT.search(problem) is None:
        return  # no value named: fewer tasks or another QoS is the honest advice
    followed = follow(conf, problem)
    assert problem_of(followed, qos) is None, (
        f"the refusal said: {problem}\nwith that value: {rendered(followed)} -> {problem_of(followed, qos)}")


# --- H5: per-user and per-account QoS/association limits are told as per-job limits -----------------


@pytest.mark.parametrize("code", ["QOSMaxJobsPerUserLimit", "QOSMaxCpuPerUserLimit", "QOSMaxNodePerUserLimit",
                                  "QOSMaxMemoryPerUser", "QOSMaxGRESPerUser", "AssocMaxJobsLimit"])
def test_a_limit_on_a_users_running_jobs_is_not_told_as_a_per_job_limit(code: str) -> None:
    """Slurm's codes for limits on what a user's (or association's) running jobs hold together: the
    job runs once the owner's other jobs end (slurm.h; the local cluster gives QOSMaxJobsPerUserLimit
    for a QoS with MaxJobsPU, seen by hand)."""
    why = slurm.explain_reason(code)
    assert "per-job" not in why.words and not why.attention, why


# --- H10: a QoS's budget of minutes used up: told to wait for the QoS's jobs to end ----------------------


@pytest.mark.parametrize("code", ["QOSGrpCPUMinutesLimit", "QOSGrpWallLimit", "QOSGrpMemoryMinutes"])
def test_a_used_up_qos_budget_is_not_told_to_come_back_when_jobs_end(code: str) -> None:
    """A budget of minutes counts what ended jobs used too: their ending gives nothing back (Slurm's
    GrpTRESMins and GrpWall; usage decays only with PriorityDecayHalfLife, or is reset by an admin)."""
    account = slurm.explain_reason("AssocGrpCPUMinutesLimit")
    assert "budget" in account.todo  # precondition: the account's family says it
    why = slurm.explain_reason(code)
    assert "budget" in why.todo, why


# --- Slurm: a throwaway QoS -------------------------------------------------------------------------


def sacctmgr(*words: str) -> None:
    subprocess.run(["sacctmgr", "-i", *words], capture_output=True, text=True, timeout=30, check=True)


@contextlib.contextmanager
def throwaway_qos(name: str, *settings: str) -> Iterator[str]:
    """A QoS ``name`` with ``settings`` that root's account may use, known to slurmctld; deleted afterwards."""
    assert name.startswith("hostile5-")
    subprocess.run(["sacctmgr", "-i", "delete", "qos", name], capture_output=True, timeout=30)  # a killed run's
    sacctmgr("add", "qos", name, *settings)
    try:
        sacctmgr("modify", "account", ACCOUNT, "set", f"qos+={name}")
        deadline = time.monotonic() + 30
        while True:  # slurmctld learns the association's new QoS from slurmdbd shortly after
            test = subprocess.run(["sbatch", "--test-only", f"--qos={name}", "--mem=100M", "-t", "1", "-o", "/dev/null",
                                   "--wrap", "true"],
                                  capture_output=True, text=True, timeout=30)
            if test.returncode == 0:
                break
            assert time.monotonic() < deadline, test.stderr
            time.sleep(0.5)
        yield name
    finally:
        subprocess.run(["sacctmgr", "-i", "modify", "account", ACCOUNT, "set", f"qos-={name}"], capture_output=True,
                       timeout=30)
        subprocess.run(["sacctmgr", "-i", "delete", "qos", name], capture_output=True, timeout=30)


def launch(cache: Path, tmp_path: Path, *extra: str, per_task: str = "1") -> subprocess.CompletedProcess:
    return submit(["-m", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                   f"hydra.launcher.trials_per_task={per_task}", *tiny_overrides(cache, tmp_path / "out"),
                   "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=5", *extra],
                  tmp_path)


def queued_by(tmp_path: Path) -> list[str]:
    """Every job the launch from ``tmp_path`` queued (squeue by working directory: the report job too)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%Z"], capture_output=True, text=True, timeout=30).stdout
    return [job for job, _, wd in (ln.partition("|") for ln in out.splitlines()) if Path(wd.strip()) == tmp_path]


def cancel(jobs: list[str]) -> None:
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)


def waited_on(queued: list[str], settled: Callable[[list[str]], bool], timeout_s: float = 20) -> list[str]:
    """The queued jobs' pending reasons (squeue), once ``settled`` holds for them or the deadline passes."""
    reasons: list[str] = []
    deadline = time.monotonic() + timeout_s
    while queued and time.monotonic() < deadline:
        reasons = subprocess.run(["squeue", "-h", "-j", ",".join(queued), "-o", "%r"], capture_output=True,
                                 text=True, timeout=30).stdout.split()
        if settled(reasons):
            break
        time.sleep(0.5)
    return reasons


def launch_and_cancel(cache: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """A held launch, what it queued (the report job too), then all of it cancelled."""
    try:
        proc = launch(cache, tmp_path, *extra, "hydra.launcher.additional_parameters={hold: true}")
        return proc, queued_by(tmp_path)
    finally:
        cancel(queued_by(tmp_path))


# --- H6: report_after under a QoS: the trials fit, the report job's own 2 GB does not ----------------


@pytest.mark.slurm
def test_a_report_job_the_qos_refuses_is_refused_before_the_trials_are_queued(synthetic_cache: Path,
                                                                               tmp_path: Path) -> None:
    with throwaway_qos("hostile5-q", "MaxTRESPerJob=cpu=1,mem=1G", "MaxWall=5", "Flags=DenyOnLimit") as qos:
        proc, queued = launch_and_cancel(synthetic_cache, tmp_path, f"hydra.launcher.qos={qos}",
                                         "hydra.launcher.report_after=true")
    output = proc.stdout + proc.stderr
    # Either both jobs are queued, or the launch is refused with nothing queued: never half of it.
    if proc.returncode == 0:
        assert len(queued) == 2, output[-3000:]
    else:
        assert queued == [] and "Traceback" not in proc.stderr, f"queued {queued}:\n{output[-3000:]}"


@pytest.mark.slurm
def test_a_report_job_slurm_refuses_takes_the_queued_trials_back(synthetic_cache: Path, tmp_path: Path) -> None:
    """H6's other half: the report job refused for a reason of its own (here the QoS lets a user have one job
    in the queue, which the trial takes): the trials already queued are cancelled, nothing is recorded, one
    message says so."""
    with throwaway_qos("hostile5-submit1", "MaxSubmitJobsPerUser=1") as qos:
        proc, queued = launch_and_cancel(synthetic_cache, tmp_path, f"hydra.launcher.qos={qos}",
                                         "hydra.launcher.report_after=true")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert "nothing was queued: slurm refused the report job (hydra.launcher.report_after) of the 1 task(s), which " \
           "were taken back" in proc.stderr, proc.stderr[-3000:]
    assert queued == []
    assert list((tmp_path / "sweep").glob("*/job.json")) == []


# --- H7: a QoS per-job limit without DenyOnLimit (Slurm's default): queued, pends for ever ---------------


@pytest.mark.slurm
def test_a_job_over_a_qos_limit_without_deny_on_limit_is_refused(synthetic_cache: Path, tmp_path: Path) -> None:
    with throwaway_qos("hostile5-nodeny", "MaxTRESPerJob=cpu=1") as qos:
        try:
            proc = launch(synthetic_cache, tmp_path, f"hydra.launcher.qos={qos}", "hydra.launcher.cpus_per_task=2")
            queued = queued_by(tmp_path)
            reasons = waited_on(queued, lambda rs: bool(rs) and all(r.startswith("QOSMax") for r in rs))
        finally:
            cancel(queued_by(tmp_path))
    assert proc.returncode == 1 and queued == [], (
        f"queued {queued} (waiting on {reasons}):\n{(proc.stdout + proc.stderr)[-2000:]}")


# --- H8: the start line under a QoS whose group allowance is 0 CPUs -------------------------------


@pytest.mark.slurm
def test_no_start_is_promised_for_a_job_its_qos_allowance_can_never_hold(synthetic_cache: Path, tmp_path: Path) -> None:
    with throwaway_qos("hostile5-frozen", "GrpTRES=cpu=0") as qos:
        try:
            proc = launch(synthetic_cache, tmp_path, f"hydra.launcher.qos={qos}")
            queued = queued_by(tmp_path)
            reasons = waited_on(queued, lambda rs: rs == ["QOSGrpCpuLimit"])
        finally:
            cancel(queued_by(tmp_path))
    promised = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines() if ln.startswith("Slurm expects")]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # Queued (and said so), or refused in one line: a launch that failed otherwise proves nothing.
    assert proc.returncode == 0 or "nothing was queued" in proc.stderr, proc.stderr[-3000:]
    assert promised == [], f"{promised}; the job then waited on {reasons}"


# --- H9: trials_per_task=auto counts idle CPUs, not what the QoS's allowance lets start -------------------


def idle_cpus_now() -> int:
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%C"], capture_output=True, text=True, timeout=30).stdout
    line = next(ln for ln in out.splitlines() if ln.split("|")[0].endswith("*"))
    return int(line.split("|")[1].split("/")[1])  # allocated/idle/other/total


@pytest.mark.slurm
def test_packing_counts_only_the_tasks_the_qos_allowance_lets_start(synthetic_cache: Path, tmp_path: Path) -> None:
    with throwaway_qos("hostile5-grp", "GrpTRES=cpu=1") as qos:
        if idle_cpus_now() < 2:
            pytest.skip("fewer than 2 idle CPUs now (other work on the cluster): the count cannot tell")
        try:
            proc = launch(synthetic_cache, tmp_path, f"hydra.launcher.qos={qos}", "train.seed=0,1,2,3",
                          "hydra.launcher.additional_parameters={hold: true}", per_task="auto")
        finally:
            cancel(queued_by(tmp_path))
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("packing (hydra.launcher.trials_per_task=auto)")] or [
        proc.stdout[-2000:] + proc.stderr[-2000:]]
    slots = re.search(r"(\d+) task\(s\) of 1 CPU\(s\) can start now", line)
    assert slots is not None, line
    assert int(slots.group(1)) <= 1, line
