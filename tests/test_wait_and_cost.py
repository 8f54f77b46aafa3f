"""Why a job waits, and what a sweep cost (issue 23: items 2, 3, 5, 6).

Unit tests of our own logic use stand-in query functions (which Slurm commands are asked, and
how their answers are joined); the parsers are tested on recorded output in test_status.py. The
tests marked ``slurm`` ask the real local cluster and check our figures against sacct's own fields.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_hpc import slurm
from mnist_hpc.login import status
from mnist_hpc.login import trials as trials_mod
from mnist_hpc.login.report import build, cost
from tests.helpers import fake_metrics, make_trial, status_rows, until

GB = 1024**3


def usage(**kw) -> slurm.Usage:
    base = dict(elapsed_s=100.0, cpu_s=150.0, alloc_cpus=2, core_s=200.0, req_mem_bytes=4 * GB, max_rss_bytes=GB)
    return slurm.Usage(**{**base, **kw})


class Calls:
    """Stand-ins for squeue and sacct that record what each was asked."""

    def __init__(self, live: dict[str, slurm.Row], acct: slurm.Accounting, stats: dict | None = None) -> None:
        self.live, self.acct, self.stats = live, acct, stats or {}
        self.squeue: list[list[str]] = []
        self.sacct: list[list[str]] = []
        self.sstat: list[list[str]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "Calls":
        monkeypatch.setattr(slurm, "query_squeue", lambda ids: self.squeue.append(sorted(ids)) or self.live)
        monkeypatch.setattr(slurm, "query_sacct", lambda ids: self.sacct.append(sorted(ids)) or self.acct)
        monkeypatch.setattr(slurm, "query_sstat", lambda ids: self.sstat.append(sorted(ids)) or self.stats)
        return self


def row(state: str, reason: str = "", start: str = "") -> slurm.Row:
    return {"state": state, "elapsed": "0:00", "node": "", "exit_code": "", "reason": reason, "start": start}


def test_a_queued_array_is_one_squeue_call_and_no_sacct(monkeypatch: pytest.MonkeyPatch):
    ids = [f"5_{i}" for i in range(10_000)]
    live = {j: row("PENDING", "Priority", "2026-12-07T14:20:00") for j in ids}
    calls = Calls(live, slurm.Accounting()).install(monkeypatch)
    snap = slurm.job_snapshot(ids)
    assert len(calls.squeue) == 1 and calls.sacct == [] and calls.sstat == []
    assert snap.rows["5_9999"]["reason"] == "Priority" and len(snap.rows) == 10_000


def test_ended_jobs_are_asked_of_accounting_only_and_running_ones_of_both(monkeypatch: pytest.MonkeyPatch):
    acct = slurm.Accounting({"1": row("COMPLETED"), "2": row("PENDING")}, {"1": usage()})
    calls = Calls({"2": row("RUNNING"), "3": row("PENDING", "JobHeldUser")}, acct).install(monkeypatch)
    snap = slurm.job_snapshot(["1", "2", "3"], settled=["1"])
    # The ended job 1 is not asked of the controller; the pending job 3 is not asked of accounting.
    assert calls.squeue == [["2", "3"]] and calls.sacct == [["1", "2"]]
    # The controller is current: 2 runs although accounting still says PENDING.
    assert {j: r["state"] for j, r in snap.rows.items()} == {"1": "COMPLETED", "2": "RUNNING", "3": "PENDING"}
    assert snap.usage == {"1": usage()} and calls.sstat == []  # 2 runs, but accounting has no usage for it yet


def test_running_jobs_usage_so_far_comes_from_one_sstat_call(monkeypatch: pytest.MonkeyPatch):
    live = {"4_0": {**row("RUNNING"), "raw_id": "41"}, "4_1": {**row("RUNNING"), "raw_id": "42"}}
    acct = slurm.Accounting({}, {"4_0": usage(cpu_s=None, max_rss_bytes=None), "4_1": usage(cpu_s=None)})
    calls = Calls(live, acct, {"41": (50.0, 2 * GB), "42": (20.0, GB // 2)}).install(monkeypatch)
    snap = slurm.job_snapshot(["4_0", "4_1"])
    assert calls.sstat == [["41", "42"]] and len(calls.sacct) == 1
    assert (snap.usage["4_0"].cpu_s, snap.usage["4_0"].max_rss_bytes) == (50.0, 2 * GB)
    assert snap.usage["4_0"].cpu_efficiency == 0.25
    # A peak accounting already has (an ended step) is kept when sstat's current one is lower.
    assert (snap.usage["4_1"].cpu_s, snap.usage["4_1"].max_rss_bytes) == (20.0, GB)


def packed_sweep(tmp_path: Path, walls: list[float | None]) -> list[trials_mod.Trial]:
    sweep = tmp_path / "sweep"
    for num, wall in enumerate(walls):
        make_trial(sweep, num, [f"train.seed={num}"], cluster="slurm", job_id="9_0", packed_slot=num, ended=True,
                   metrics=None if wall is None else fake_metrics(0.97, 0.98, 0.98, wall=wall))
    return trials_mod.read_trials(trials_mod.find_runs(sweep)[1])[0]


def test_a_packed_task_is_split_by_recorded_wall_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    Calls({}, slurm.Accounting({"9_0": row("COMPLETED")}, {"9_0": usage(core_s=3600.0, cpu_s=1800.0)})).install(monkeypatch)
    trials = packed_sweep(tmp_path, [30.0, 10.0])
    assert [t.share for t in trials] == [0.75, 0.25]
    assert [t.cost_row()["core_hours"] for t in trials] == [0.75, 0.25]
    assert [t.cost_row()["cpu_time_s"] for t in trials] == [1350.0, 450.0]
    # Efficiency and memory are the task's: its trials ran together.
    assert {t.cost_row()["cpu_efficiency"] for t in trials} == {0.5}
    totals = trials_mod.cost_totals(trials)
    assert totals is not None and totals.jobs == 1 and totals.core_hours == 1.0


def test_a_trial_without_a_wall_time_makes_the_split_even_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    Calls({}, slurm.Accounting({"9_0": row("FAILED")}, {"9_0": usage(core_s=3600.0)})).install(monkeypatch)
    trials = packed_sweep(tmp_path, [30.0, None, 10.0])
    assert [round(t.share, 6) for t in trials] == [round(1 / 3, 6)] * 3
    assert all("no wall time for trial 1" in t.share_note for t in trials)


def test_advice_on_an_oversized_memory_request_and_idle_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The example: asked 4 GB, peak 0.9 GB; and 4 CPUs of which one was busy.
    acct = slurm.Accounting({"9_0": row("COMPLETED")},
                            {"9_0": usage(max_rss_bytes=int(0.9 * GB), alloc_cpus=4, core_s=400.0, cpu_s=100.0)})
    Calls({}, acct).install(monkeypatch)
    trials = packed_sweep(tmp_path, [30.0])
    assert cost.advice(trials) == [
        "asked 4.00 GB, peak 0.90 GB: hydra.launcher.mem_gb=2 fits",
        "4 CPUs per job, CPU efficiency 25%: CPUs sat idle; hydra.launcher.cpus_per_task=2 fits",
    ]
    section = cost.cost_section(trials)
    assert "| all | 1 | 0.111 | 0.000 | 25% | 0.90 GB | 4.00 GB |" in section


def test_requests_that_fit_get_no_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    acct = slurm.Accounting({"9_0": row("COMPLETED")}, {"9_0": usage(max_rss_bytes=3 * GB, cpu_s=180.0)})
    Calls({}, acct).install(monkeypatch)
    assert cost.advice(packed_sweep(tmp_path, [30.0])) == []


@pytest.mark.parametrize("code", ["QOSGrpCpuLimit", "AssocMaxWallDurationPerJobLimit", "SomethingNew",
                                  "ReqNodeNotAvail, UnavailableNodes:vm", "Priority"])
def test_the_summary_names_each_reason_code_once(code: str):
    from mnist_hpc.login.trials import Trial
    from mnist_hpc import rundir

    pending = Trial(run_dir=None, files=rundir.RunFiles(Path()), job_id="5_0", state="PENDING", reason=code)
    line = status.wait_summary([pending])
    bare = code.partition(",")[0]
    assert line.count(bare) == 1, line
    assert line.startswith(f"1 PENDING: 1 {slurm.explain_reason(code).words}"), line


def test_a_large_sweep_is_summarised_and_lists_only_what_needs_attention(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    sweep = tmp_path / "sweep"
    live = {}
    for num in range(40):
        make_trial(sweep, num, [f"train.seed={num}"], cluster="slurm", job_id=f"7_{num}")
        live[f"7_{num}"] = row("RUNNING") if num < 4 else (
            row("PENDING", "Priority", "2026-12-07T14:20:00") if num < 38 else row("PENDING", "JobHeldAdmin"))
    # Running: accounting has no CPU time for them yet (parse_sacct leaves it None).
    Calls(live, slurm.Accounting({}, {f"7_{n}": usage(cpu_s=None) for n in range(4)})).install(monkeypatch)
    trials, _ = trials_mod.fill_states(status.collect(str(sweep)))
    text = status.format_status(trials, show_all=False)
    table, summary = text.split("\n\n")
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["38", "39"]  # held by an admin: ask them
    assert summary.splitlines()[:3] == [
        "40 trial(s): 36 PENDING, 4 RUNNING",
        "36 PENDING: 34 waiting its turn: jobs with higher priority go first (Priority), expected start "
        "2026-12-07 14:20: wait; 2 held by an administrator (JobHeldAdmin): ask your site's admins why it is held",
        "4 RUNNING: 0.22 core-hours, peak memory 1.00G of 4.00G asked",
    ]
    assert len(status.format_status(trials, show_all=True).split("\n\n")[0].splitlines()) == 41


# --- on the real local cluster ---------------------------------------------------------------------


def when(value, condition):
    """``value`` if ``condition(value)`` holds, else None (for :func:`tests.helpers.until`)."""
    return value if condition(value) else None


def sbatch(*args: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def fake_trials(sweep: Path, job_ids: list[str], **kw) -> None:
    for num, job_id in enumerate(job_ids):
        make_trial(sweep, num, [f"train.seed={num}"], cluster="slurm", job_id=job_id, **kw)


def status_text(target: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "mnist_hpc.login.status", str(target)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slurm
def test_status_of_a_held_job_and_of_one_pending_on_its_dependency(tmp_path: Path):
    held = sbatch("--hold", "--wrap", "true")
    dependent = sbatch(f"--dependency=afterok:{held}", "--wrap", "true")
    try:
        fake_trials(tmp_path / "sweep", [held, dependent])
        rows = until(lambda: when(status_rows(tmp_path / "sweep"), lambda r: r[1]["reason"] == "Dependency"),
                     "squeue to give the dependency as the reason", timeout_s=30)
        assert [(r["state"], r["reason"]) for r in rows] == [("PENDING", "JobHeldUser"), ("PENDING", "Dependency")]
        assert rows[0]["todo"] == f"release it: scontrol release {held}" and rows[0]["reason_words"] == "held by its owner"
        assert rows[1]["todo"].startswith("wait") and rows[0]["cost"] is None
        text = status_text(tmp_path / "sweep")
        assert f"1 held by its owner (JobHeldUser): release it: scontrol release {held}" in text
        assert "1 waiting for the jobs it depends on to end (Dependency)" in text
    finally:
        subprocess.run(["scancel", held, dependent], timeout=30)


def frozen_account() -> str:
    """The local cluster's sub-account with an allowance of 0 CPUs (slurm/cluster.sh register_limits)."""
    out = subprocess.run(["sacctmgr", "-n", "-P", "list", "assoc", "format=account,user,grptres"],
                         capture_output=True, text=True, timeout=30).stdout
    [account] = {line.split("|")[0] for line in out.splitlines() if line.endswith("||cpu=0")}
    return account


@pytest.mark.slurm
def test_status_of_jobs_pending_on_a_qos_and_on_an_account_limit(tmp_path: Path):
    """Slurm's own QoS and association reasons (the local cluster enforces both), in words, in text and --json."""
    on_qos = sbatch("--qos=frozen", "--wrap", "true")
    on_account = sbatch(f"--account={frozen_account()}", "--wrap", "true")
    try:
        fake_trials(tmp_path / "sweep", [on_qos, on_account])
        rows = until(lambda: when(status_rows(tmp_path / "sweep"),
                                  lambda r: [x["reason"] for x in r] == ["QOSGrpCpuLimit", "AssocGrpCpuLimit"]),
                     "squeue to give the QoS and the account's limits as the reasons", timeout_s=30)
        assert [r["state"] for r in rows] == ["PENDING", "PENDING"]
        assert rows[0]["reason_words"] == "over its QoS's group allowance, which other jobs may be using (QOSGrpCpuLimit)"
        assert rows[1]["reason_words"] == (
            "over its account's allowance, which other jobs may be using (AssocGrpCpuLimit)")
        assert "hydra.launcher.qos" in rows[0]["todo"] and "hydra.launcher.account" in rows[1]["todo"]
        text = status_text(tmp_path / "sweep")
        assert "1 over its QoS's group allowance, which other jobs may be using (QOSGrpCpuLimit): wait for jobs" in text
        assert "1 over its account's allowance, which other jobs may be using (AssocGrpCpuLimit): wait for your" in text
    finally:
        subprocess.run(["scancel", on_qos, on_account], timeout=30)


def sacct_fields(job_id: str, extra: str = "") -> dict[str, str]:
    """sacct's own line for the job (without -X: with it, TotalCPU leaves out the steps and reads 0)."""
    fields = "JobID,TotalCPU,Elapsed,ElapsedRaw,AllocCPUS,CPUTimeRAW" + (f",{extra}" if extra else "")
    out = subprocess.run(["sacct", "-n", "-P", "-o", fields, "-j", job_id], capture_output=True, text=True,
                         timeout=30).stdout
    lines = [dict(zip(fields.split(","), line.split("|"))) for line in out.splitlines()]
    return next((line for line in lines if line["JobID"] == job_id), {})


@pytest.mark.slurm
def test_a_running_then_finished_job_s_figures_agree_with_sacct(tmp_path: Path):
    # Two CPUs, one busy for about 4 s (efficiency at most 50%), then waiting for the test's go.
    go = tmp_path / "go"
    busy = f"{sys.executable} -c 'import time; t = time.time()\nwhile time.time() - t < 4: pass'"
    job = sbatch("-c", "2", "--wrap", f"{busy}; while [ ! -e {go} ]; do sleep 0.2; done")
    try:
        # While it runs: its elapsed time and core-hours so far (sacct), its CPU time and peak memory so far (sstat).
        [running] = until(lambda: when(status_rows(job), lambda r: r[0]["state"] == "RUNNING" and r[0]["cost"]
                                       and r[0]["cost"]["cpu_time_s"] is not None and r[0]["cost"]["elapsed_s"] > 0),
                          "the job to run and appear in accounting and sstat", timeout_s=30)
        assert running["cost"]["alloc_cpus"] == 2 and running["cost"]["max_rss_gb"] is not None
        assert 0 <= running["cost"]["cpu_efficiency"] <= 0.5 + 0.1  # one busy CPU of two (sampled, so a margin)
        assert running["cost"]["core_hours"] == pytest.approx(2 * running["cost"]["elapsed_s"] / 3600, abs=1e-6)
    finally:
        go.touch()
        done = until(lambda: when(sacct_fields(job), lambda f: f.get("TotalCPU", "00:00:00") not in ("00:00:00", "")),
                     "the job to end with its CPU time in accounting", timeout_s=30)
    # Two trials packed into that job, with wall times 30 and 10 s.
    sweep = tmp_path / "sweep"
    for num, wall in enumerate([30.0, 10.0]):
        make_trial(sweep, num, [f"train.seed={num}"], cluster="slurm", job_id=job, packed_slot=num,
                   metrics=fake_metrics(0.97, 0.98, 0.98, wall=wall))
    total_cpu, core_s = slurm.parse_duration(done["TotalCPU"]), float(done["CPUTimeRAW"])
    assert core_s == float(done["ElapsedRaw"]) * int(done["AllocCPUS"])  # sacct's own definition
    built = build.build_report(sweep)
    rows = [t.cost_row() for t in built.trials]
    assert [r["share"] for r in rows] == [0.75, 0.25]
    assert sum(r["core_hours"] for r in rows) == pytest.approx(core_s / 3600, abs=1e-5)
    assert rows[0]["core_hours"] == pytest.approx(0.75 * core_s / 3600, abs=1e-5)
    assert rows[0]["cpu_efficiency"] == pytest.approx(total_cpu / core_s, abs=1e-4)
    assert sum(r["cpu_time_s"] for r in rows) == pytest.approx(total_cpu, abs=1e-2)
    # At most one busy CPU of two: its processes ran one after another. ElapsedRaw is whole seconds,
    # so CPU time may exceed it by up to a second (seen: 0.504 for a job of about 5 s).
    assert 0 < rows[0]["cpu_efficiency"] <= (float(done["ElapsedRaw"]) + 1) / core_s + 1e-3
    assert f"| all | 1 | {core_s / 3600:.3f} |" in built.markdown
    csv_rows = (built.out_dir / build.CSV_FILE).read_text().splitlines()
    assert "core_hours" in csv_rows[0] and len(csv_rows) == 3
    assert json.loads(json.dumps(rows))  # plain values, as --json prints them


@pytest.mark.slurm
def test_gpu_hours_agree_with_sacct_for_a_job_that_had_a_gpu(tmp_path: Path):
    # The local cluster gives each node one pretend GPU (slurm/cluster.sh: gres.conf); nothing
    # computes on it, but Slurm allocates and accounts for it as for a real one.
    job = sbatch("--gpus-per-node=1", "-c", "1", "--wrap", "sleep 2")
    done = until(lambda: when(sacct_fields(job, "AllocTRES,State"), lambda f: f.get("State") == "COMPLETED"),
                 "the GPU job to end in accounting", timeout_s=60)
    assert "gres/gpu=1" in done["AllocTRES"].split(",")  # precondition: Slurm recorded the GPU
    sweep = tmp_path / "sweep"
    make_trial(sweep, 0, ["train.seed=0"], cluster="slurm", job_id=job, metrics=fake_metrics(0.97, 0.98, 0.98, wall=2.0))
    [row] = [t.cost_row() for t in build.build_report(sweep).trials]
    assert row["gpus"] == 1
    assert row["gpu_hours"] == pytest.approx(float(done["ElapsedRaw"]) / 3600, abs=1e-6)
    assert row["core_hours"] == pytest.approx(float(done["CPUTimeRAW"]) / 3600, abs=1e-6)
    # And a job without one has none.
    cpu_job = sbatch("-c", "1", "--wrap", "true")
    until(lambda: when(sacct_fields(cpu_job, "State"), lambda f: f.get("State") == "COMPLETED"),
          "the CPU job to end in accounting", timeout_s=60)
    make_trial(sweep, 1, ["train.seed=1"], cluster="slurm", job_id=cpu_job, metrics=fake_metrics(0.97, 0.98, 0.98, wall=1.0))
    rows = {t.number: t.cost_row() for t in build.build_report(sweep).trials}
    assert (rows[1]["gpus"], rows[1]["gpu_hours"]) == (0, 0.0) and rows[0]["gpus"] == 1


def test_learning_curves_of_a_large_sweep_are_bounded(tmp_path: Path):
    from mnist_hpc.login.report import plots

    sweep = tmp_path / "sweep"
    n = plots.MAX_CURVES + 10
    for num in range(n):
        logged = tuple({"epoch": 1, "accuracy": num / (2 * n), "loss": 0.3, "seconds": 1.0} for _ in range(1))
        make_trial(sweep, num, [f"train.seed={num}"], started_epochs=3, epochs_logged=logged)
    trials, _ = trials_mod.read_trials(trials_mod.find_runs(sweep)[1])
    fig = plots.learning_curves_figure(trials)
    [ax] = fig.axes
    assert len(ax.lines) == plots.MAX_CURVES
    # The highest curves are the ones drawn: trials 10..n-1 (accuracy grows with the trial number).
    assert sorted(float(line.get_ydata()[0]) for line in ax.lines)[0] == pytest.approx(10 / (2 * n))
    assert f"the {plots.MAX_CURVES} highest of {n}" in ax.get_title()


@pytest.mark.slurm
@pytest.mark.slow  # about 15-25 s: 10,000 trial directories read twice
def test_a_10000_task_held_array_is_one_squeue_call_and_a_short_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Issue 23 item 6 (its timing is benchmarks/bench_scale.py's: no wall-clock assert here)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from bench_scale import wrappers, write_trials

    array = sbatch("--hold", "--array=0-9999", "--wrap", "true")
    try:
        write_trials(tmp_path / "sweep", [f"{array}_{i}" for i in range(10_000)])
        log = tmp_path / "calls.log"
        wrappers(tmp_path / "bin", log)
        env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
        proc = subprocess.run([sys.executable, "-m", "mnist_hpc.login.status", str(tmp_path / "sweep")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert log.read_text().split() == ["squeue"]
        lines = proc.stdout.splitlines()
        assert len(lines) == 15  # header, 10 held trials, blank, 3 summary lines
        assert lines[-3:] == ["10000 trial(s): 10000 PENDING",
                              f"10000 PENDING: 10000 held by its owner (JobHeldUser): release it: scontrol release {array}",
                              "(listed: 10 of the 10000 trial(s) that need attention; --all lists all 10000)"]
        log.write_text("")
        report = subprocess.run([sys.executable, "-m", "mnist_hpc.login.report.cli", str(tmp_path / "sweep")], env=env,
                                capture_output=True, text=True, timeout=120)
        assert report.returncode == 0, report.stderr
        assert log.read_text().split() == ["squeue"]
        assert "No cost figures: Slurm's accounting gave none for these trials' jobs" in report.stdout
    finally:
        subprocess.run(["scancel", array], timeout=60)


# --- a search: its workers' jobs are asked in the same query as its trials' --------------------------


def search_dir_with_workers(tmp_path: Path) -> Path:
    """A search with two Slurm workers: 8_0 ran trials 0 and 1, 8_1 waits (held)."""
    from mnist_hpc import search as sd

    search_dir = tmp_path / "search"
    spec = {"study_name": "s", "direction": "maximize", "n_trials": 4, "params": {"optimizer.learning_rate": "interval(0.001,0.01)"},
            "fixed": [], "enqueue": [], "sampler": {"_target_": "optuna.samplers.RandomSampler"}, "pruner": None,
            "heartbeat_s": 1.0, "stale_after_s": 30.0, "workers": 2, "identity": {"data.sha256": "a" * 64}}
    search_dir.mkdir()
    (search_dir / sd.SPEC_FILE).write_text(json.dumps(spec))
    for num, wall in ((0, 30.0), (1, 90.0)):
        make_trial(search_dir, num, [f"optimizer.learning_rate=0.00{num + 1}"], cluster="slurm", job_id="8_0",
                   metrics=fake_metrics(0.97, 0.96, 0.95, wall=wall))
    for job_id, state, trial in (("8_0", "done", None), ("8_1", "queued", None)):
        sd.write_beat(search_dir, sd.WorkerBeat(job_id=job_id, cluster="slurm", host="", state=state, trial=trial))
    return search_dir


def test_a_search_report_asks_slurm_once_for_its_workers_and_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("optuna")
    search_dir = search_dir_with_workers(tmp_path)
    acct = slurm.Accounting({"8_0": row("COMPLETED")}, {"8_0": usage(elapsed_s=120.0, core_s=240.0, cpu_s=200.0)})
    calls = Calls({"8_1": row("PENDING", "JobHeldUser")}, acct).install(monkeypatch)
    report = build.build_report(search_dir)
    assert len(calls.squeue) == 1 and len(calls.sacct) == 1 and calls.sstat == []
    assert calls.squeue == [["8_0", "8_1"]] and calls.sacct == [["8_0"]]  # 8_1 pends: accounting is not asked
    shares = sorted(round(t.share, 2) for t in report.trials)
    assert shares == [0.25, 0.75]  # worker 8_0's cost split by the trials' wall times (30 s and 90 s)
    assert len(report.trials) == 2  # the workers are not trials


def test_status_of_a_search_says_why_a_worker_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("optuna")
    from mnist_hpc.login.study import format_status, read_study, status_json

    search_dir = search_dir_with_workers(tmp_path)
    acct = slurm.Accounting({"8_0": row("COMPLETED")}, {"8_0": usage()})
    calls = Calls({"8_1": row("PENDING", "JobHeldUser", "")}, acct).install(monkeypatch)
    view = read_study(search_dir)
    assert len(calls.squeue) == 1 and len(calls.sacct) <= 1
    workers = {w["job_id"]: w for w in status_json(view)["workers"]}
    assert workers["8_1"]["reason"] == "JobHeldUser" and workers["8_1"]["slurm_state"] == "PENDING"
    assert workers["8_0"]["cost"]["core_hours"] == round(usage().core_hours, 6)
    held = slurm.explain_reason("JobHeldUser")
    assert f"waits: {held.words}" in workers["8_1"]["message"] and held.todo in workers["8_1"]["message"]
    assert f"waits: {held.words}" in format_status(view)
