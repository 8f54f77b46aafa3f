"""The site preflight's parts, without Slurm (issue 23 item 1): the parsers of sinfo, scontrol and
``sbatch --test-only`` on recorded output (tests/data/site/README.md says which files are recorded
and which are written from Slurm's documented messages), the request read from the sbatch text
submitit renders, and the limits at their boundaries.

The refusals on the real cluster are in tests/test_slurm_site.py.
"""

from __future__ import annotations


import pytest

from mnist_hpc import slurm
from mnist_hpc.login.launcher.options import SlurmQueueConf
from mnist_hpc.login.launcher.site import (
    limits_problem,
    memory_mb,
    refusal,
    request_of,
    sbatch_flags,
)
from tests.helpers import REPO

DATA = REPO / "tests" / "data" / "site"


def read(name: str) -> str:
    return (DATA / name).read_text()


LOCAL = (slurm.parse_partitions(read("scontrol_partition.txt")), slurm.parse_nodes(read("sinfo_nodes.txt")))
SITE = (slurm.parse_partitions(read("scontrol_partition_gpu_site.txt")), slurm.parse_nodes(read("sinfo_nodes_gpu_site.txt")))


# --- parsers ---


@pytest.mark.parametrize("text, minutes", [
    ("UNLIMITED", None), ("INFINITE", None), ("10", 10), ("10:30", 10.5), ("00:10:00", 10), ("1:00:01", 60 + 1 / 60),
    ("1-00:00:00", 1440), ("2-3", 2 * 1440 + 180), ("1-2:30", 1440 + 150), ("7-00:00:00", 7 * 1440), ("0", 0),
])
def test_slurm_durations(text: str, minutes) -> None:
    assert slurm.slurm_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "ten", "1:2:3:4", "-5", "1-", "x-01:00:00", "1:-2"])
def test_a_duration_slurm_does_not_write_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        slurm.slurm_minutes(text)


@pytest.mark.parametrize("gres, gpus", [
    ("(null)", 0), ("gpu:2", 2), ("gpu:a100:4(S:0-1)", 4), ("gpu:v100:2,gpu:t4:1", 3), ("tmp:100G", 0),
    ("tmp:100G,gpu:1", 1), ("mps:100", 0),
])
def test_gpus_in_a_gres_string(gres: str, gpus: int) -> None:
    assert slurm.gpu_count(gres) == gpus


def test_the_local_clusters_recorded_partitions_and_nodes() -> None:
    partitions, nodes = LOCAL
    assert sorted(partitions) == ["debug", "one", "short"]
    assert [p.name for p in partitions.values() if p.default] == ["debug"]
    assert partitions["short"].max_time_min == 10 and partitions["debug"].max_time_min is None
    assert partitions["debug"].total_nodes == 2 and partitions["debug"].max_nodes is None
    by_name = {n.name: n for n in nodes}
    assert sorted(by_name) == ["localhost", "vm"]
    assert by_name["vm"].partitions == ("debug", "one", "short") and by_name["localhost"].partitions == ("debug", "short")
    assert {(n.cpus, n.memory_mb, n.gpus) for n in nodes} == {(2, 22899, 0)}


def test_a_gpu_sites_partitions_and_nodes() -> None:
    partitions, nodes = SITE
    assert partitions["cpu"].max_time_min == 2 * 1440 and partitions["cpu"].default
    assert partitions["long"].max_cpus_per_node == 64 and partitions["long"].max_mem_per_node_mb == 250000
    assert partitions["gpu"].max_nodes == 2
    by_name = {n.name: n for n in nodes}
    assert by_name["g001"].gpus == 4 and by_name["g002"].gpus == 3
    assert by_name["c001"].partitions == ("cpu", "long")


@pytest.mark.parametrize("name, rc, ok, words", [
    ("ok", 0, True, None),
    ("node_config", 1, False, "Requested node configuration is not available"),
    ("partition", 1, False, "invalid partition specified: nope; Invalid partition name specified"),
    ("unrecognized", 255, False, "unrecognized option '--holdd'"),
    ("reservation", 1, False, "Requested reservation is invalid"),
    ("gres", 1, False, "Invalid generic resource (gres) specification"),
    ("qos_policy", 1, False, "Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)"),
    ("qos_cpu", 1, False, "QOSMaxCpuPerJobLimit; Job violates accounting/QOS policy (job submit limit, user's size "
                          "and/or time limits)"),
    ("invalid_qos", 1, False, "Invalid qos specification"),
    ("invalid_account", 1, False, "Invalid account or account/partition combination specified"),
    ("time_limit", 1, False, "Requested time limit is invalid (missing or exceeds some limit)"),
])
def test_sbatch_test_only_answers(name: str, rc: int, ok: bool, words) -> None:
    answer = slurm.parse_will_run(rc, read(f"test_only_{name}.txt"))
    assert answer.ok is ok
    assert answer.error == words
    if ok:
        assert (answer.start, answer.nodes, answer.partition) == ("2026-12-07T05:27:50", "vm", "short")


def test_an_expected_start_is_shown_only_when_foreseeable() -> None:
    """Slurm 22.05 answers year 6109 or 10193 when it cannot place a job (seen on the local cluster)."""
    from datetime import datetime

    from mnist_hpc.login.launcher.site import start_line

    now = datetime(2026, 12, 7, 5, 0)
    soon = slurm.parse_will_run(0, read("test_only_ok.txt"))
    assert start_line(soon, now) == "Slurm expects the first task to start at 2026-12-07T05:27:50 on vm (partition short)"
    for never in ("6109-12-30T07:26:43", "10193-01-21T09:33:43", "2027-12-09T05:00:00"):
        far = slurm.parse_will_run(0, f"sbatch: Job 1 to start at {never} using 1 processors on nodes vm in partition debug")
        assert start_line(far, now) == ("Slurm accepts the job (partition debug) but foresees no start time now; "
                                        "mnist-hpc-status says why it waits")


def test_a_start_line_with_a_failing_exit_code_is_a_refusal() -> None:
    answer = slurm.parse_will_run(1, read("test_only_ok.txt"))
    assert not answer.ok and answer.error.startswith("Job ")


def test_silence_and_a_failure_code_is_a_refusal_that_says_so() -> None:
    assert slurm.parse_will_run(1, "").error == "sbatch --test-only exited with 1 and said nothing"


@pytest.mark.parametrize("name, where", [
    ("qos_policy", "hydra.launcher.qos"), ("qos_cpu", "hydra.launcher.qos"), ("invalid_qos", "hydra.launcher.qos"),
    ("invalid_account", "hydra.launcher.account"),
    ("partition", "hydra.launcher.partition"), ("time_limit", "hydra.launcher.timeout_min"),
    ("node_config", "hydra.launcher.cpus_per_task, mem_gb"), ("gres", "hydra.launcher.gpus_per_node"),
    ("reservation", "hydra.launcher.additional_parameters.reservation"),
    ("unrecognized", "hydra.launcher.additional_parameters (its keys are sbatch's long options"),
])
def test_a_refusal_by_slurm_is_one_line_naming_where_to_look(name: str, where: str) -> None:
    rc = 255 if name == "unrecognized" else 1
    message = refusal(slurm.parse_will_run(rc, read(f"test_only_{name}.txt")))
    assert message.startswith("nothing was queued: Slurm refuses this job (sbatch --test-only): ")
    assert f"check {where}" in message and "\n" not in message


# --- the request, as the rendered sbatch text asks for it ---


@pytest.mark.parametrize("text, mb", [("4GB", 4096), ("4G", 4096), ("512M", 512), ("512MB", 512), ("512", 512),
                                      ("1.5G", 1536), ("1T", 1024 * 1024), ("2048K", 2)])
def test_memory_sizes(text: str, mb: int) -> None:
    assert memory_mb(text) == mb


def rendered(conf: SlurmQueueConf) -> dict[str, str]:
    """The #SBATCH flags submitit renders for ``conf``, as the launch does."""
    import submitit

    from mnist_hpc.login.launcher.options import executor_init, submitit_parameters
    from mnist_hpc.login.launcher.site import sbatch_script

    executor = submitit.AutoExecutor(folder="/scratch/u/sweep/.submitit/%A", cluster="slurm", **executor_init(conf, "slurm"))
    executor.update_parameters(**submitit_parameters(conf, "slurm"))
    return sbatch_flags(sbatch_script(executor))


def test_the_request_is_read_from_the_text_submitit_renders() -> None:
    conf = SlurmQueueConf(cpus_per_task=3, mem_gb=1.5, timeout_min=90, nodes=2, tasks_per_node=2, gpus_per_node=4,
                          gpu_request="gpus_per_task", partition="gpu")
    request = request_of(rendered(conf), conf)
    assert (request.partition, request.minutes, request.nodes, request.tasks_per_node, request.cpus_per_task,
            request.mem_mb, request.gpus_per_node) == ("gpu", 90, 2, 2, 3, 1536, 4)
    assert request.asked("cpus-per-task") == "hydra.launcher.cpus_per_task=3"


def test_additional_parameters_are_checked_as_sbatch_gets_them_and_named_as_themselves() -> None:
    """submitit writes additional_parameters last: what sbatch would get is what is checked, and named."""
    conf = SlurmQueueConf(timeout_min=20, additional_parameters={"partition": "short", "mail-type": "END"})
    request = request_of(rendered(conf), conf)
    assert request.partition == "short" and request.minutes == 20
    assert limits_problem(request, *LOCAL) == ("hydra.launcher.timeout_min=20 asks for 20 minutes, but partition short's "
                                               "MaxTime is 00:10:00; hydra.launcher.timeout_min=10 fits")
    conf = SlurmQueueConf(additional_parameters={"partition": "nope"})
    assert limits_problem(request_of(rendered(conf), conf), *LOCAL) == (
        "hydra.launcher.additional_parameters.partition=nope: no partition nope on this cluster; its partitions are "
        "debug, one, short")


@pytest.mark.parametrize("additional, message", [
    ({"time": "0-01:00:00"}, "hydra.launcher.additional_parameters.time would replace --time, which "
                             "hydra.launcher.timeout_min sets; set hydra.launcher.timeout_min instead"),
    ({"cpus_per_task": 4}, "hydra.launcher.additional_parameters.cpus_per_task would replace --cpus-per-task, which "
                           "hydra.launcher.cpus_per_task sets; set hydra.launcher.cpus_per_task instead"),
    ({"mem": "30G"}, "hydra.launcher.additional_parameters.mem would replace --mem, which hydra.launcher.mem_gb sets; "
                     "set hydra.launcher.mem_gb instead"),
    ({"job-name": "x"}, "hydra.launcher.additional_parameters.job-name would replace --job-name, which "
                        "hydra.launcher.name sets; set hydra.launcher.name instead"),
])
def test_a_key_that_would_replace_a_launcher_flag_is_refused(additional, message) -> None:
    from mnist_hpc.login.launcher.site import replaced_flags

    assert replaced_flags(SlurmQueueConf(additional_parameters={"hold": True, **additional})) == message


def test_new_keys_and_flags_no_option_renders_are_taken() -> None:
    """A partition the options leave unset, sbatch's own keys, and submitit's wckey may be given."""
    from mnist_hpc.login.launcher.site import replaced_flags

    taken = {"hold": True, "mail-type": "END", "partition": "short", "reservation": "r", "wckey": "mine", "gres": "tmp:10G"}
    assert replaced_flags(SlurmQueueConf(additional_parameters=taken)) is None
    assert replaced_flags(SlurmQueueConf(partition="short", additional_parameters={"partition": "debug"})) == (
        "hydra.launcher.additional_parameters.partition would replace --partition, which hydra.launcher.partition sets; "
        "set hydra.launcher.partition instead")


def request(**options) -> object:
    conf = SlurmQueueConf(**options)
    return request_of(rendered(conf), conf)


# --- the limits at their boundaries (the local cluster's recorded partitions and nodes) ---


def test_what_the_largest_node_holds_fits_and_one_more_is_refused() -> None:
    assert limits_problem(request(cpus_per_task=2, mem_gb=22, partition="short", timeout_min=10), *LOCAL) is None
    assert limits_problem(request(cpus_per_task=3), *LOCAL) == (
        "hydra.launcher.cpus_per_task=3 asks for 3 CPUs per node, but partition debug's largest node has 2; "
        "hydra.launcher.cpus_per_task=2 fits")
    assert limits_problem(request(mem_gb=23), *LOCAL) == (
        "hydra.launcher.mem_gb=23 asks for 23 GB per node, but partition debug's largest node has 22.4 GB (22899 MB); "
        "hydra.launcher.mem_gb=22 fits")
    assert limits_problem(request(partition="short", timeout_min=11), *LOCAL) == (
        "hydra.launcher.timeout_min=11 asks for 11 minutes, but partition short's MaxTime is 00:10:00; "
        "hydra.launcher.timeout_min=10 fits")


def test_the_memory_a_node_has_in_mb_fits_to_the_megabyte() -> None:
    assert limits_problem(request(mem_gb=22899 / 1024), *LOCAL) is None
    assert "asks for" in limits_problem(request(mem_gb=22900 / 1024), *LOCAL)


def test_cpus_count_per_node_over_its_tasks() -> None:
    problem = limits_problem(request(cpus_per_task=2, tasks_per_node=2), *LOCAL)
    assert problem.startswith("hydra.launcher.cpus_per_task=2 x hydra.launcher.tasks_per_node=2 asks for 4 CPUs per node")
    assert problem.endswith("hydra.launcher.cpus_per_task=1 fits")
    assert limits_problem(request(cpus_per_task=1, tasks_per_node=2), *LOCAL) is None


def test_nodes_beyond_the_partition_and_an_unknown_partition() -> None:
    assert limits_problem(request(nodes=2), *LOCAL) is None
    assert limits_problem(request(nodes=3), *LOCAL) == (
        "hydra.launcher.nodes=3 asks for 3 nodes, but partition debug allows 2; hydra.launcher.nodes=2 fits")
    assert limits_problem(request(nodes=2, partition="one"), *LOCAL).endswith("hydra.launcher.nodes=1 fits")
    assert limits_problem(request(partition="nope"), *LOCAL) == (
        "hydra.launcher.partition=nope: no partition nope on this cluster; its partitions are debug, one, short")


def test_several_partitions_refuse_only_when_none_can_run_it() -> None:
    assert limits_problem(request(partition="short,debug", timeout_min=30), *LOCAL) is None
    assert limits_problem(request(partition="short,one", timeout_min=30), *LOCAL) is None  # one has no MaxTime
    # short's MaxTime and one's single node: neither can; the first partition's reason is given.
    assert "partition short's MaxTime" in limits_problem(request(partition="short,one", timeout_min=30, nodes=2), *LOCAL)


def test_no_gpus_on_the_local_cluster() -> None:
    assert limits_problem(request(gpus_per_node=1), *LOCAL) == (
        "hydra.launcher.gpus_per_node=1 asks for 1 GPU(s) per node, but partition debug's nodes have none; "
        "hydra.launcher.gpus_per_node=0 fits")


# --- a GPU site (written, not recorded: see tests/data/site/README.md) ---


def test_gpus_and_a_partitions_caps() -> None:
    assert limits_problem(request(partition="gpu", gpus_per_node=4, cpus_per_task=16, mem_gb=100), *SITE) is None
    assert limits_problem(request(partition="gpu", gpus_per_node=5), *SITE).endswith("hydra.launcher.gpus_per_node=4 fits")
    assert limits_problem(request(partition="gpu", gpus_per_node=2, gpu_request="gres"), *SITE) is None
    # MaxCPUsPerNode and MaxMemPerNode cap the partition's nodes below what they have.
    assert limits_problem(request(partition="long", cpus_per_task=64, mem_gb=200), *SITE) is None
    assert limits_problem(request(partition="long", cpus_per_task=65), *SITE).endswith("cpus_per_task=64 fits")
    assert "hydra.launcher.mem_gb=244 fits" in limits_problem(request(partition="long", mem_gb=245), *SITE)
    assert limits_problem(request(timeout_min=2 * 1440), *SITE) is None
    assert "MaxTime is 2-00:00:00" in limits_problem(request(timeout_min=2 * 1440 + 1), *SITE)


def test_no_single_node_has_it_all_at_once() -> None:
    """Every setting fits some node of the partition, but no node all of them: still refused."""
    partitions, nodes = SITE
    both = {**partitions, "mixed": partitions["cpu"].__class__("mixed", False, None, None, 2, None, None)}
    mixed = [slurm.NodeLimits("fat", 16, 4_000_000, 0, ("mixed",)), slurm.NodeLimits("wide", 128, 500_000, 0, ("mixed",))]
    problem = limits_problem(request(partition="mixed", cpus_per_task=64, mem_gb=1000), both, nodes + mixed)
    assert problem is not None and "no node of partition mixed has all of that at once" in problem
    assert limits_problem(request(partition="mixed", cpus_per_task=64, mem_gb=400), both, nodes + mixed) is None
    two = limits_problem(request(partition="mixed", cpus_per_task=64, mem_gb=400, nodes=2), both, nodes + mixed)
    assert two.endswith("partition mixed has 1 such node(s); hydra.launcher.nodes=1 fits")


def test_a_check_that_could_not_be_made_is_said_not_passed(monkeypatch) -> None:
    """scontrol/sinfo or sbatch not answering: the launch goes on, and says which check it lacks."""
    import submitit

    from mnist_hpc.login.launcher import site
    from mnist_hpc.login.launcher.options import executor_init, submitit_parameters

    conf = SlurmQueueConf(cpus_per_task=64)
    executor = submitit.AutoExecutor(folder="/scratch/u/sweep/.submitit/%A", cluster="slurm", **executor_init(conf, "slurm"))
    executor.update_parameters(**submitit_parameters(conf, "slurm"))
    monkeypatch.setattr(slurm, "site_limits", lambda: None)
    monkeypatch.setattr(slurm, "will_run", lambda script: None)
    assert site.check_site(executor, conf).lines == [
        "note: the partitions' limits could not be read (scontrol show partition, sinfo): the job was not checked against them",
        "note: sbatch --test-only could not be asked: Slurm did not judge the job before it was queued",
    ]
    monkeypatch.setattr(slurm, "site_limits", lambda: LOCAL)
    with pytest.raises(site.PreflightError, match="cpus_per_task=64 asks for 64 CPUs per node"):
        site.check_site(executor, conf)


@pytest.mark.parametrize("key", ["output", "error", "open_mode", "open-mode", "array"])
def test_a_key_that_would_replace_submitits_own_flag_is_refused(key) -> None:
    from mnist_hpc.login.launcher.preflight import check_slurm_options
    from mnist_hpc.login.launcher.plan import PreflightError

    flag = key.replace("_", "-")
    with pytest.raises(PreflightError) as info:
        check_slurm_options(SlurmQueueConf(additional_parameters={"hold": True, key: "x"}))
    assert str(info.value) == (f"nothing was queued: hydra.launcher.additional_parameters.{key} would replace --{flag}, "
                               "which submitit sets (the sweep's array, where the job's logs are found); remove it")


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\0b"])
def test_an_additional_parameter_on_two_lines_is_refused(value) -> None:
    from mnist_hpc.login.launcher.preflight import check_slurm_options
    from mnist_hpc.login.launcher.plan import PreflightError

    with pytest.raises(PreflightError, match=r"^nothing was queued: hydra.launcher.additional_parameters.comment holds a "
                                             r"line break or NUL, which no sbatch option takes; give it on one line$"):
        check_slurm_options(SlurmQueueConf(additional_parameters={"comment": value}))


@pytest.mark.parametrize("timeout_min, delay, refused", [(2, 119, False), (2, 120, True), (2, 600, True), (60, 120, False)])
def test_the_warning_signal_must_come_after_the_job_starts(timeout_min, delay, refused) -> None:
    from mnist_hpc.login.launcher.preflight import check_slurm_options
    from mnist_hpc.login.launcher.plan import PreflightError

    conf = SlurmQueueConf(timeout_min=timeout_min, signal_delay_s=delay)
    if not refused:
        check_slurm_options(conf)
        return
    with pytest.raises(PreflightError, match=rf"signal_delay_s={delay} asks .* timeout_min={timeout_min} gives the job "
                                             rf"{timeout_min * 60} s: it would be told to stop as it starts"):
        check_slurm_options(conf)


# What `sinfo -h -N -O SINFO_GPUS_FORMAT` printed on the local cluster (one pretend GPU per node),
# with vm's GPU in use by a job; a drained node and another partition's node added by hand.
SINFO_GPUS = """\
localhost                     |short            |idle     |gpu:1          |gpu:0              |
localhost                     |debug*           |idle     |gpu:1          |gpu:0              |
vm                            |one              |mix      |gpu:1          |gpu:1(IDX:0)       |
vm                            |debug*           |mix      |gpu:1          |gpu:1(IDX:0)       |
g001                          |debug*           |drain    |gpu:4          |gpu:0              |
g002                          |gpu              |idle     |gpu:a100:4(S:0-1)|gpu:a100:1(IDX:0)|
"""


def test_gpu_slots_count_each_usable_node_once_by_its_free_gpus():
    assert slurm.parse_gpu_slots(SINFO_GPUS, None, 1) == 1  # localhost's; vm's is in use, g001 drained
    assert slurm.parse_gpu_slots(SINFO_GPUS, "debug", 1) == 1
    assert slurm.parse_gpu_slots(SINFO_GPUS, "gpu", 1) == 3 and slurm.parse_gpu_slots(SINFO_GPUS, "gpu", 2) == 1
    assert slurm.parse_gpu_slots(SINFO_GPUS, "one", 1) == 0
    assert slurm.parse_gpu_slots(SINFO_GPUS, "nope", 1) is None and slurm.parse_gpu_slots("", None, 1) is None


# --- a QoS's per-job limits, named when Slurm refuses them ---


def test_qos_limits_are_read_from_sacctmgr() -> None:
    text = read("sacctmgr_qos.txt")
    assert slurm.parse_qos(text, "small") == slurm.QosLimits("small", {"cpu": 1, "mem": 1024}, {}, 5)
    assert slurm.parse_qos(text, "normal") == slurm.QosLimits("normal", {}, {}, None)
    assert slurm.parse_qos(text, "frozen") == slurm.QosLimits("frozen", {}, {}, None, {"cpu": 0})
    assert slurm.parse_qos(text, "nope") is None
    # A site's forms: memory in MB with and without its unit, GPUs, nodes, per node, a day of wall time.
    site = "gpu|cpu=64,mem=256000,gres/gpu=8,node=2,billing=99|cpu=32,mem=128G,gres/gpu=4|1-00:00:00|cpu=512\n"
    assert slurm.parse_qos(site, "gpu") == slurm.QosLimits(
        "gpu", {"cpu": 64, "mem": 256000, "gpu": 8, "node": 2}, {"cpu": 32, "mem": 131072, "gpu": 4}, 1440, {"cpu": 512})


def test_any_sacctmgr_answer_is_read_without_raising() -> None:
    """Another process's output: whatever it holds, the parser answers limits or None."""
    import random

    rng = random.Random(23)
    alphabet = "small||=,cpu mem gres/gpu node 0123456789GMKT:-x\n\t"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        limits = slurm.parse_qos(text, "small")
        assert limits is None or (limits.name == "small" and all(v >= 0 for v in limits.per_job.values()))


def qos_request(**conf_kw) -> tuple[dict[str, str], SlurmQueueConf]:
    conf = SlurmQueueConf(**{"cpus_per_task": 1, "mem_gb": 1, "timeout_min": 5, "qos": "small", **conf_kw})
    return rendered(conf), conf


SMALL = slurm.QosLimits("small", {"cpu": 1, "mem": 1024}, {}, 5)
SITE_QOS = slurm.QosLimits("gpu", {"cpu": 16, "gpu": 4, "node": 2}, {"cpu": 8, "mem": 8192, "gpu": 2}, 1440)


@pytest.mark.parametrize("qos, conf_kw, problem", [
    (SMALL, {}, None),
    (SMALL, {"cpus_per_task": 2}, "hydra.launcher.cpus_per_task=2 asks for 2 CPUs per job, but QoS small allows 1 "
                                  "(MaxTRESPerJob cpu=1); hydra.launcher.cpus_per_task=1 fits"),
    (SMALL, {"mem_gb": 1.5}, "hydra.launcher.mem_gb=1.5 asks for 1.5 GB per job, but QoS small allows 1 GB "
                             "(MaxTRESPerJob mem=1024M); hydra.launcher.mem_gb=1 fits"),
    (SMALL, {"timeout_min": 6}, "hydra.launcher.timeout_min=6 asks for 6 minutes, but QoS small allows 00:05:00 "
                                "(MaxWall); hydra.launcher.timeout_min=5 fits"),
    (SITE_QOS, {"cpus_per_task": 8, "nodes": 2, "timeout_min": 60}, None),
    (SITE_QOS, {"cpus_per_task": 5, "tasks_per_node": 2, "nodes": 1, "timeout_min": 60},
     "hydra.launcher.cpus_per_task=5 x hydra.launcher.tasks_per_node=2 asks for 10 CPUs per node, but QoS gpu allows 8 "
     "(MaxTRESPerNode cpu=8); hydra.launcher.cpus_per_task=4 fits"),
    (SITE_QOS, {"cpus_per_task": 6, "tasks_per_node": 2, "nodes": 2, "timeout_min": 60},
     "hydra.launcher.cpus_per_task=6 x hydra.launcher.tasks_per_node=2 x hydra.launcher.nodes=2 asks for 24 CPUs per "
     "job, but QoS gpu allows 16 (MaxTRESPerJob cpu=16); hydra.launcher.cpus_per_task=6 x "
     "hydra.launcher.tasks_per_node=2 asks for 12 CPUs per node, but QoS gpu allows 8 (MaxTRESPerNode cpu=8); "
     "hydra.launcher.cpus_per_task=4 fits"),
    (SITE_QOS, {"nodes": 3, "timeout_min": 60}, "hydra.launcher.nodes=3 asks for 3 nodes, but QoS gpu allows 2 "
                                                "(MaxTRESPerJob node=2); hydra.launcher.nodes=2 fits"),
    (SITE_QOS, {"gpus_per_node": 3, "timeout_min": 60},
     "the job asks for 3 GPU(s) per node, but QoS gpu allows 2 (MaxTRESPerNode gres/gpu=2); "
     "hydra.launcher.gpus_per_node=2 fits"),
    (SITE_QOS, {"mem_gb": 9, "timeout_min": 60}, "hydra.launcher.mem_gb=9 asks for 9 GB per node, but QoS gpu allows "
                                                 "8 GB (MaxTRESPerNode mem=8192M); hydra.launcher.mem_gb=8 fits"),
    (SITE_QOS, {"timeout_min": 1441}, "hydra.launcher.timeout_min=1441 asks for 1441 minutes, but QoS gpu allows "
                                      "1-00:00:00 (MaxWall); hydra.launcher.timeout_min=1440 fits"),
])
def test_a_qos_limit_is_named_with_a_value_that_fits(qos, conf_kw, problem) -> None:
    from mnist_hpc.login.launcher.site import qos_problem

    flags, conf = qos_request(**conf_kw)
    assert qos_problem(request_of(flags, conf), qos) == problem


def test_a_partition_time_limit_under_a_minute_names_another_partition() -> None:
    part = slurm.PartitionLimits("tiny", True, 0.5, None, 1, None, None)  # the default partition
    flags, conf = qos_request(qos=None, timeout_min=1)
    problem = limits_problem(request_of(flags, conf), {"tiny": part}, [slurm.NodeLimits("n", 2, 4096, 0, ("tiny",))])
    assert problem is not None and problem.endswith("no job can ask that little: use another hydra.launcher.partition")


NOWHERE = "no job can ask that little: use another hydra.launcher.qos"


@pytest.mark.parametrize("limits, conf_kw, fit", [
    (slurm.QosLimits("q", {"cpu": 0}, {}, None), {}, NOWHERE),
    (slurm.QosLimits("q", {"cpu": 1}, {}, None), {"tasks_per_node": 2},
     "ask for fewer tasks per node or nodes, or use another hydra.launcher.qos"),
    (slurm.QosLimits("q", {"mem": 0}, {}, None), {}, NOWHERE),
    (slurm.QosLimits("q", {"mem": 5}, {}, None), {}, NOWHERE),  # under 0.01 GB: mem_gb cannot say it
    (slurm.QosLimits("q", {"mem": 512}, {}, None), {}, "hydra.launcher.mem_gb=0.5 fits"),
    (slurm.QosLimits("q", {"node": 0}, {}, None), {}, NOWHERE),
    (slurm.QosLimits("q", {}, {}, 0.5), {}, NOWHERE),
    (slurm.QosLimits("q", {}, {}, 0), {}, NOWHERE),
])
def test_a_qos_limit_below_any_job_names_no_value_that_would_be_refused(limits, conf_kw, fit) -> None:
    """0 CPUs, 0 nodes, a MaxWall under a minute, memory mem_gb cannot state: never `...=0 fits` (0 is refused)."""
    from mnist_hpc.login.launcher.site import qos_problem

    flags, conf = qos_request(**{"qos": "q", **conf_kw})
    problem = qos_problem(request_of(flags, conf), limits)
    assert problem is not None and problem.endswith(fit), problem
    assert "=0 fits" not in problem


@pytest.mark.parametrize("qos_kw, limits, outcome", [
    ({}, SMALL, "no qos asked"),  # no QoS named: sacctmgr is not asked
    ({"qos": "small"}, SMALL, "ok"),
    ({"qos": "small", "cpus_per_task": 2}, SMALL, "refused"),
    ({"qos": "small", "cpus_per_task": 2}, None, "note"),  # limits unreadable: said, not passed
    ({"additional_parameters": {"qos": "small"}, "cpus_per_task": 2}, SMALL, "refused"),
])
def test_the_named_qos_is_checked_once_before_slurm_is_asked(monkeypatch, qos_kw, limits, outcome) -> None:
    import submitit

    from mnist_hpc.login.launcher import site
    from mnist_hpc.login.launcher.options import executor_init, submitit_parameters

    conf = SlurmQueueConf(**{"cpus_per_task": 1, "mem_gb": 1, "timeout_min": 5, **qos_kw})
    executor = submitit.AutoExecutor(folder="/scratch/u/sweep/.submitit/%A", cluster="slurm", **executor_init(conf, "slurm"))
    executor.update_parameters(**submitit_parameters(conf, "slurm"))
    asked: list[str] = []
    monkeypatch.setattr(slurm, "site_limits", lambda: LOCAL)
    monkeypatch.setattr(slurm, "qos_limits", lambda name: asked.append(name) or limits)
    monkeypatch.setattr(slurm, "will_run", lambda script: asked.append("--test-only") or slurm.parse_will_run(
        0, read("test_only_ok.txt")))
    if outcome == "refused":
        with pytest.raises(site.PreflightError, match=r"asks for 2 CPUs per job, but QoS small allows 1 \(MaxTRESPerJob "
                                                      r"cpu=1\); hydra.launcher.cpus_per_task=1 fits"):
            site.check_site(executor, conf)
        assert asked == ["small"]
        return
    answer = site.check_site(executor, conf)
    lines = answer.lines
    assert answer.qos == (limits if qos_kw else None)  # handed on to packing
    assert asked == {"no qos asked": ["--test-only"], "ok": ["small", "--test-only"], "note": ["small", "--test-only"]}[outcome]
    notes = [line for line in lines if line.startswith("note:")]
    assert notes == ([
        "note: the limits of QoS small could not be read (sacctmgr show qos): the job was not checked against them"
    ] if outcome == "note" else [])
