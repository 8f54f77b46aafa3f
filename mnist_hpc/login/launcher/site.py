"""The preflight against the site: a job no node or limit of the cluster can ever run is refused
before anything is queued, and what remains is put to Slurm itself (``sbatch --test-only``).

Without it such a job is queued and stays PENDING for ever (reason PartitionConfig, or
PartitionTimeLimit: Slurm's EnforcePartLimits=NO, its default, accepts it).

The request checked is read from the sbatch script that submitit renders for the launch (the
same text it would submit), never re-spelled from the options: ``additional_parameters``, which
submitit writes last, is seen as sbatch sees it. Three steps, once per launch (one request; a
launch's trials share their ``hydra.launcher``):

1. the partition's and nodes' limits (one ``scontrol show partition`` and one ``sinfo`` call):
   CPUs, memory and GPUs per node, MaxTime, MaxNodes. A refusal is one line naming the setting,
   the limit and a value that fits;
2. the per-job and per-node limits and the group allowance of the QoS the job names (one
   ``sacctmgr show qos`` call, only when it names one): Slurm queues a job over them unless the
   QoS has DenyOnLimit, and the job never starts. A refusal names every limit the request is over
   and the settings that fit them all;
3. ``sbatch --test-only`` with the script: QoS, associations, reservations, features, and sbatch
   options it does not know. Its expected start is returned for the launch to print.

A request that could run, only not now, is not refused. The local launcher has no site.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional, Sequence

from mnist_hpc import slurm
from mnist_hpc.login.launcher.options import SlurmQueueConf
from mnist_hpc.login.launcher.plan import PreflightError

# The launcher option behind each sbatch flag it renders (for messages); a flag set through
# additional_parameters is named as that key instead.
OPTION_OF_FLAG = {
    "partition": "partition", "time": "timeout_min", "nodes": "nodes", "ntasks-per-node": "tasks_per_node",
    "cpus-per-task": "cpus_per_task", "mem": "mem_gb", "gpus-per-node": "gpus_per_node", "gres": "gpus_per_node",
    "gpus-per-task": "gpus_per_node", "qos": "qos", "account": "account", "constraint": "constraint",
}


# More launcher options behind rendered flags, named when additional_parameters would replace them.
OPTION_OF_OTHER_FLAG = {"job-name": "name", "signal": "signal_delay_s", "exclude": "exclude"}


def sbatch_script(executor: Any) -> str:
    """The batch script submitit would submit for one job of ``executor`` (an ``AutoExecutor`` for Slurm).

    submitit's renderer is private API, reached here alone; tests/test_sbatch_text.py pins its text.
    """
    inner = executor._executor
    return inner._make_submission_file_text(inner._submitit_command_str, "preflight")


def sbatch_flags(script: str) -> dict[str, str]:
    """The ``#SBATCH --key=value`` lines of a script (``--key`` alone: ``""``); a repeated key, the last."""
    flags: dict[str, str] = {}
    for line in script.splitlines():
        if not line.startswith("#SBATCH --"):
            continue
        words = shlex.split(line[len("#SBATCH --"):])
        if words:
            key, _, value = words[0].partition("=")
            flags[key] = value
    return flags


@dataclass(frozen=True)
class Request:
    """One job's resources, as its sbatch flags ask for them, and the setting behind each."""

    partition: Optional[str]
    minutes: Optional[float]
    nodes: int
    tasks_per_node: int
    cpus_per_task: int
    mem_mb: Optional[int]
    gpus_per_node: int
    # The sbatch flag that asks for the GPUs (gpus-per-node, gres or gpus-per-task), None without GPUs.
    gpu_flag: Optional[str] = None
    # Seconds before the time limit that the warning signal comes (--signal=USR2@120), None without one.
    signal_s: Optional[int] = None
    # sbatch flag -> the setting a user changes (hydra.launcher.X, or additional_parameters.K when set there).
    setting: dict[str, str] = field(default_factory=dict)
    # sbatch flag -> that setting's value, as the user wrote it.
    value: dict[str, Any] = field(default_factory=dict)

    def name(self, flag: str) -> str:
        return self.setting.get(flag, f"hydra.launcher.{OPTION_OF_FLAG.get(flag, flag)}")

    def asked(self, flag: str) -> str:
        """``setting=value`` of the setting behind ``flag``."""
        shown = self.value.get(flag)
        return f"{self.name(flag)}={shown:g}" if isinstance(shown, float) else f"{self.name(flag)}={shown}"


def memory_mb(text: str) -> int:
    """sbatch's ``--mem`` in MB: ``4GB`` or ``4G`` -> 4096, ``512M`` or ``512`` -> 512 (Slurm's units are binary).

    Raises:
        ValueError: not such a size.
    """
    value = text.strip().upper().removesuffix("B")
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    factor = scale.get(value[-1:], None)
    number = float(value[:-1] if factor is not None else value)
    return math.ceil(number * (factor if factor is not None else 1))


def request_of(flags: dict[str, str], conf: SlurmQueueConf) -> Request:
    """The request that ``flags`` (:func:`sbatch_flags` of the script rendered from ``conf``) make.

    Raises:
        ValueError: a value this parser does not read (the caller leaves it to sbatch --test-only).
    """
    setting: dict[str, str] = {}
    value: dict[str, Any] = {flag: getattr(conf, option) for flag, option in OPTION_OF_FLAG.items()}
    for key, given in conf.additional_parameters.items():
        flag = str(key).replace("_", "-")  # as submitit writes it
        setting[flag], value[flag] = f"hydra.launcher.additional_parameters.{key}", given
    tasks = int(flags.get("ntasks-per-node", "1") or 1)
    gpus = 0
    gpu_flag = next((f for f in ("gpus-per-node", "gres", "gpus-per-task") if f in flags), None)
    signal = flags.get("signal", "").rpartition("@")[2]
    if "gpus-per-node" in flags:
        gpus = int(flags["gpus-per-node"].rpartition(":")[2])
    elif "gres" in flags:
        gpus = slurm.gpu_count(flags["gres"])
    elif "gpus-per-task" in flags:
        gpus = int(flags["gpus-per-task"].rpartition(":")[2]) * tasks
    return Request(
        partition=flags.get("partition") or None,
        minutes=slurm.slurm_minutes(flags["time"]) if "time" in flags else None,
        nodes=int(flags.get("nodes", "1").partition("-")[0] or 1),
        tasks_per_node=tasks,
        cpus_per_task=int(flags.get("cpus-per-task", "1") or 1),
        mem_mb=memory_mb(flags["mem"]) if flags.get("mem") else None,
        gpus_per_node=gpus,
        gpu_flag=gpu_flag if gpus else None,
        signal_s=int(signal) if signal.isdigit() else None,
        setting=setting,
        value=value,
    )


def _fit_gb(mb: int) -> str:
    """The largest memory in GB (as mem_gb takes it) within ``mb``."""
    return str(mb // 1024) if mb >= 1024 else f"{math.floor(mb / 1024 * 100) / 100:g}"


def _hhmmss(minutes: float) -> str:
    days, rest = divmod(int(minutes), 1440)
    return (f"{days}-" if days else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


def gpu_fit(request: Request, most: int) -> str:
    """What fits a limit of ``most`` GPUs per node, in the setting and spelling that asked for them."""
    flag = request.gpu_flag or "gpus-per-node"
    tasks = request.tasks_per_node
    if flag in request.setting:  # asked through additional_parameters: named as that key, in its own form
        if flag == "gpus-per-task":
            per_task = most // tasks
            return f"{request.name(flag)}={per_task} fits" if per_task else f"drop {request.name(flag)} or ask for fewer tasks per node"
        if not most:
            return f"drop {request.name(flag)}"
        return f"{request.name(flag)}={'gpu:' if flag == 'gres' else ''}{most} fits"
    if flag == "gpus-per-task":  # gpu_request=gpus_per_task: at least one GPU per task
        if most >= tasks:
            return f"hydra.launcher.gpus_per_node={most // tasks * tasks} fits"
        return ("hydra.launcher.gpus_per_node=0 fits" if not most
                else f"hydra.launcher.tasks_per_node={most} hydra.launcher.gpus_per_node={most} fits")
    return f"hydra.launcher.gpus_per_node={most} fits"


def time_fit(request: Request, most_min: int) -> Optional[str]:
    """The time limit within ``most_min`` minutes that the launcher also takes (its warning signal must
    come after the job starts: preflight.check_slurm_options), as settings; None below a minute."""
    if most_min < 1:
        return None
    fit = f"{request.name('time')}={most_min}"
    if request.signal_s is not None and request.signal_s >= most_min * 60:
        fit += f" hydra.launcher.signal_delay_s={max(1, most_min * 60 // 4)}"
    return fit


def partition_problem(request: Request, part: slurm.PartitionLimits, nodes: Sequence[slurm.NodeLimits]) -> Optional[str]:
    """Why no node or limit of ``part`` can ever run ``request`` (one line), or None if one can."""
    if request.minutes is not None and part.max_time_min is not None and request.minutes > part.max_time_min:
        fit = time_fit(request, int(part.max_time_min))
        return (f"{request.asked('time')} asks for {request.minutes:g} minutes, but partition {part.name}'s "
                f"MaxTime is {_hhmmss(part.max_time_min)}; {_fits(fit, 'hydra.launcher.partition')}")
    most_nodes = min(n for n in (part.max_nodes, part.total_nodes or len(nodes)) if n is not None)
    if request.nodes > most_nodes:
        return (f"{request.asked('nodes')} asks for {request.nodes} nodes, but partition {part.name} "
                f"allows {most_nodes}; {request.name('nodes')}={most_nodes} fits")
    if not nodes:
        return None  # a partition without nodes now: not for us to judge (sbatch --test-only says)
    cap = part.max_cpus_per_node

    def cpus_of(node: slurm.NodeLimits) -> int:
        return min(node.cpus, cap) if cap else node.cpus

    def mem_of(node: slurm.NodeLimits) -> int:
        return min(node.memory_mb, part.max_mem_per_node_mb) if part.max_mem_per_node_mb else node.memory_mb

    cpus = request.cpus_per_task * request.tasks_per_node
    most_cpus = max(cpus_of(n) for n in nodes)
    if cpus > most_cpus:
        asked = request.asked("cpus-per-task")
        if request.tasks_per_node > 1:
            asked += f" x {request.asked('ntasks-per-node')}"
        per_task = most_cpus // request.tasks_per_node
        fit = (f"{request.name('cpus-per-task')}={per_task}" if per_task >= 1
               else f"{request.name('ntasks-per-node')}={most_cpus // request.cpus_per_task or 1}")
        return f"{asked} asks for {cpus} CPUs per node, but partition {part.name}'s largest node has {most_cpus}; {fit} fits"
    most_mem = max(mem_of(n) for n in nodes)
    if request.mem_mb is not None and request.mem_mb > most_mem:
        name = request.name("mem")
        fit = _fit_gb(most_mem) if name == "hydra.launcher.mem_gb" else f"{most_mem}M"
        return (f"{request.asked('mem')} asks for {request.mem_mb / 1024:g} GB per node, but partition {part.name}'s "
                f"largest node has {most_mem / 1024:.1f} GB ({most_mem} MB); {name}={fit} fits")
    most_gpus = max(n.gpus for n in nodes)
    if request.gpus_per_node > most_gpus:
        flag = request.gpu_flag or "gpus-per-node"
        have = f"at most {most_gpus}" if most_gpus else "none"
        return (f"{request.asked(flag)} asks for {request.gpus_per_node} GPU(s) per node, but partition "
                f"{part.name}'s nodes have {have}; {gpu_fit(request, most_gpus)}")
    fitting = [n for n in nodes if cpus_of(n) >= cpus and (request.mem_mb or 0) <= mem_of(n)
               and n.gpus >= request.gpus_per_node]
    if len(fitting) < request.nodes:
        shape = (f"the job asks for {request.nodes} node(s) with {cpus} CPUs, {request.mem_mb or 0} MB and "
                 f"{request.gpus_per_node} GPUs each")
        if fitting:
            return (f"{shape}, but partition {part.name} has {len(fitting)} such node(s); "
                    f"{request.name('nodes')}={len(fitting)} fits")
        return (f"{shape}, but no node of partition {part.name} has all of that at once; ask for less of "
                "hydra.launcher.cpus_per_task, mem_gb or gpus_per_node")
    return None


def limits_problem(request: Request, partitions: dict[str, slurm.PartitionLimits],
                   nodes: Sequence[slurm.NodeLimits]) -> Optional[str]:
    """Why no partition the request names (``a,b``: any of them; none: the default) can ever run it, or None."""
    if request.partition:
        names = [p.strip() for p in request.partition.split(",") if p.strip()]
    else:
        names = [p.name for p in partitions.values() if p.default][:1]
    if not names:
        return None  # no default partition to judge: sbatch --test-only says what it makes of it
    unknown = [n for n in names if n not in partitions]
    if unknown:
        return (f"{request.asked('partition')}: no partition {', '.join(unknown)} on this cluster; "
                f"its partitions are {', '.join(sorted(partitions))}")
    problems = [partition_problem(request, partitions[n], [x for x in nodes if n in x.partitions]) for n in names]
    return None if any(p is None for p in problems) else problems[0]


# What to look at when sbatch --test-only refuses, by words of its message.
HINTS = (
    ("qos", "hydra.launcher.qos (sacctmgr show qos; sacctmgr show assoc user=$USER)"),
    ("account", "hydra.launcher.account (sacctmgr show assoc user=$USER)"),
    ("partition", "hydra.launcher.partition (sinfo)"),
    ("time limit", "hydra.launcher.timeout_min (sinfo -o '%P %l')"),
    ("node configuration", "hydra.launcher.cpus_per_task, mem_gb, gpus_per_node, constraint (sinfo -N -l)"),
    ("gres", "hydra.launcher.gpus_per_node and gpu_request (sinfo -o '%P %G')"),
    ("feature", "hydra.launcher.constraint (sinfo -o '%P %f')"),
    ("reservation", "hydra.launcher.additional_parameters.reservation (scontrol show reservation)"),
    ("option", "hydra.launcher.additional_parameters (its keys are sbatch's long options: man sbatch)"),
)


def _fits(setting: Optional[str], elsewhere: str = "hydra.launcher.qos") -> str:
    """``X=v fits``, or (a limit below any job's least: 0 CPUs, nodes, a minute) where else to go."""
    return f"{setting} fits" if setting else f"no job can ask that little: use another {elsewhere}"


def qos_problem(request: Request, qos: slurm.QosLimits) -> Optional[str]:
    """Every limit of ``qos`` the request is over, in one line ending with the settings that fit them all, or None.

    Per job and per node (MaxTRESPerJob, MaxTRESPerNode, MaxWall), and the QoS's group allowance
    (GrpTRES): a job larger than the allowance of all its QoS's jobs together never starts either.
    """
    nodes, tasks = request.nodes, request.tasks_per_node
    cpus = request.cpus_per_task * tasks
    where = f"QoS {qos.name} allows"
    found: list[str] = []
    fits: dict[str, str] = {}  # setting -> the value that fits every limit found (the smallest)
    advice: list[str] = []  # limits no value of one setting meets

    def fit(setting: str, value: Any) -> None:
        old = fits.get(setting)
        if old is None or float(str(value).removeprefix("gpu:").rstrip("M")) < float(old.removeprefix("gpu:").rstrip("M")):
            fits[setting] = str(value)

    def take(text: Optional[str]) -> None:
        """A fit as ``setting=value ...`` (one or more) or words."""
        if text is None:
            advice.append(_fits(None))
        elif "=" in text.split(" ")[0] and text.endswith(" fits"):
            for part in text.removesuffix(" fits").split(" "):
                setting, _, value = part.partition("=")
                fit(setting, value)
        else:
            advice.append(text)

    limits_by = (("job", nodes, qos.per_job, "MaxTRESPerJob"), ("node", 1, qos.per_node, "MaxTRESPerNode"),
                 ("job", nodes, qos.per_group, "GrpTRES, all its jobs together"))
    for per, scale, limits, label in limits_by:
        if "cpu" in limits and cpus * scale > limits["cpu"]:
            per_task = limits["cpu"] // (tasks * scale)
            asked = request.asked("cpus-per-task") + (f" x {request.asked('ntasks-per-node')}" if tasks > 1 else "")
            asked += f" x {request.asked('nodes')}" if scale > 1 else ""
            found.append(f"{asked} asks for {cpus * scale} CPUs per {per}, but {where} {limits['cpu']} ({label} cpu={limits['cpu']})")
            if per_task >= 1:
                fit(request.name("cpus-per-task"), per_task)
            else:
                take("ask for fewer tasks per node or nodes, or use another hydra.launcher.qos" if limits["cpu"] >= 1 else None)
        if "mem" in limits and request.mem_mb is not None and request.mem_mb * scale > limits["mem"]:
            name, most = request.name("mem"), limits["mem"] // scale
            value = _fit_gb(most) if name == "hydra.launcher.mem_gb" else f"{most}M"
            found.append(f"{request.asked('mem')} asks for {request.mem_mb * scale / 1024:g} GB per {per}, but {where} "
                         f"{limits['mem'] / 1024:g} GB ({label} mem={limits['mem']}M)")
            take(f"{name}={value} fits" if float(value.rstrip("M")) > 0 else None)
        if "gpu" in limits and request.gpus_per_node * scale > limits["gpu"]:
            found.append(f"the job asks for {request.gpus_per_node * scale} GPU(s) per {per}, but {where} {limits['gpu']} "
                         f"({label} gres/gpu={limits['gpu']})")
            take(gpu_fit(request, limits["gpu"] // scale))
        if per != "node" and "node" in limits and nodes > limits["node"]:
            most = limits["node"]
            found.append(f"{request.asked('nodes')} asks for {nodes} nodes, but {where} {most} ({label} node={most})")
            take(f"{request.name('nodes')}={most} fits" if most else None)
    if qos.max_wall_min is not None and request.minutes is not None and request.minutes > qos.max_wall_min:
        found.append(f"{request.asked('time')} asks for {request.minutes:g} minutes, but {where} "
                     f"{_hhmmss(qos.max_wall_min)} (MaxWall)")
        minutes = time_fit(request, int(qos.max_wall_min))
        take(f"{minutes} fits" if minutes else None)
    if not found:
        return None
    settings = " ".join(f"{k}={v}" for k, v in fits.items())
    tail = [f"{settings} {'fits' if len(fits) == 1 else 'fit'}"] if fits else []
    return "; ".join(found + tail + list(dict.fromkeys(advice)))


def refusal(answer: slurm.WillRun) -> str:
    """One line: what Slurm said about the request, and where to look."""
    error = answer.error or "no reason given"
    hints = [hint for words, hint in HINTS if words in error.lower()]
    where = hints[0] if hints else "the hydra.launcher settings (partition, account, qos, additional_parameters)"
    return f"nothing was queued: Slurm refuses this job (sbatch --test-only): {error}; check {where}"


def replaced_flags(conf: SlurmQueueConf) -> Optional[str]:
    """Why an ``additional_parameters`` key may not replace a flag the launcher renders (one line), or None.

    The flags it renders are read from submitit's text for ``conf`` without additional_parameters.
    A launcher option stays the one source of its flag: status, packing and this preflight read it.
    (submitit's own flags, --output, --array and the like, are refused before: preflight.check_slurm_options.)
    """
    if not conf.additional_parameters:
        return None
    import submitit

    from mnist_hpc.login.launcher.options import executor_init, submitit_parameters

    bare = dataclasses.replace(conf, additional_parameters={})
    executor = submitit.AutoExecutor(folder=conf.submitit_folder, cluster="slurm", **executor_init(bare, "slurm"))
    executor.update_parameters(**submitit_parameters(bare, "slurm"))
    rendered = sbatch_flags(sbatch_script(executor))
    for key in conf.additional_parameters:
        flag = str(key).replace("_", "-")  # as submitit writes it
        if flag not in rendered:
            continue
        option = OPTION_OF_FLAG.get(flag) or OPTION_OF_OTHER_FLAG.get(flag)
        if option is not None:
            return (f"hydra.launcher.additional_parameters.{key} would replace --{flag}, which hydra.launcher.{option} "
                    f"sets; set hydra.launcher.{option} instead")
    return None


@dataclass(frozen=True)
class SiteAnswer:
    """What the site preflight found: the lines to print, and the named QoS's limits (for packing)."""

    lines: list[str]
    qos: Optional[slurm.QosLimits] = None


def check_site(executor: Any, conf: SlurmQueueConf) -> SiteAnswer:
    """Refuse (:class:`PreflightError`) a launch's job that the cluster can never run; else what to print.

    ``executor``: the launch's ``AutoExecutor`` for Slurm, its parameters set. Returns Slurm's
    expected start, and a note for each check that could not be made (a client that did not
    answer): never a silent pass; and the limits of the QoS the job names, when read.
    """
    if (replaced := replaced_flags(conf)) is not None:
        raise PreflightError(f"nothing was queued: {replaced}")
    script = sbatch_script(executor)
    flags = sbatch_flags(script)
    lines: list[str] = []
    try:
        request: Optional[Request] = request_of(flags, conf)
    except ValueError:
        request = None  # a value written in a form read by sbatch alone: its --test-only judges it
    limits = slurm.site_limits()
    if limits is None:
        lines.append("note: the partitions' limits could not be read (scontrol show partition, sinfo): the job was not "
                     "checked against them")
    elif request is not None and (problem := limits_problem(request, *limits)) is not None:
        raise PreflightError(f"nothing was queued: {problem}")
    qos = None
    if flags.get("qos"):
        # Slurm queues a job over its QoS's per-job limits unless the QoS has DenyOnLimit (not its
        # default), and the job then never starts (QOSMaxCpuPerJobLimit...): checked here.
        qos = slurm.qos_limits(flags["qos"])
        if qos is None:
            lines.append(f"note: the limits of QoS {flags['qos']} could not be read (sacctmgr show qos): the job was "
                         "not checked against them")
        elif request is not None and (problem := qos_problem(request, qos)) is not None:
            raise PreflightError(f"nothing was queued: {problem}")
    answer = slurm.will_run(script)
    if answer is None:
        lines.append("note: sbatch --test-only could not be asked: Slurm did not judge the job before it was queued")
    elif not answer.ok:
        raise PreflightError(refusal(answer))
    else:
        lines.insert(0, start_line(answer, datetime.now()))
    return SiteAnswer(lines, qos)


def start_line(answer: slurm.WillRun, now: datetime) -> str:
    """What a launch prints of Slurm's expected start (controller's local time, as sbatch prints it)."""
    if slurm.foreseeable_start(str(answer.start), now) is None:
        return (f"Slurm accepts the job (partition {answer.partition}) but foresees no start time now; "
                "mnist-hpc-status says why it waits")
    return f"Slurm expects the first task to start at {answer.start} on {answer.nodes} (partition {answer.partition})"
