"""Which Slurm task this process is, and where the other tasks of its job step listen.

A multi-worker training needs every worker's address before TensorFlow starts. Slurm gives
each task the step's node list (``SLURM_STEP_NODELIST``), how many tasks each node runs
(``SLURM_STEP_TASKS_PER_NODE``), how srun placed them (``SLURM_DISTRIBUTION``: block fills the
nodes in list order, cyclic deals ranks round-robin) and its own rank (``SLURM_PROCID``).
:class:`TaskLayout` turns those into one ``host:port`` per rank; each task checks that the
layout puts it on the node it runs on. Ports are derived from the job id, as JAX's Slurm detection does, so
that two jobs sharing a node do not collide and a requeued job finds the same ports again.

TensorFlow's ``SlurmClusterResolver`` reads the same variables but requires ``nvidia-smi`` on
CPU nodes (TF #56894); building the cluster here keeps CPU and GPU nodes on one path.
Pure Python, no TensorFlow: unit-testable on any machine.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Any, Optional

from mnist_hpc.compute.runtime import RuntimeInfo
from mnist_hpc.config import ConfigError, Distribution

# Ports above Linux's default ephemeral range (32768-60999), so that no outgoing connection
# holds one; each job gets a block of PORTS_PER_JOB, keyed by its id (JAX uses 61440-65535 too).
PORT_BASE = 61440
PORTS_PER_JOB = 8
PORT_BLOCKS = (65536 - PORT_BASE) // PORTS_PER_JOB

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_REPEAT = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


class LayoutError(ConfigError):
    """The Slurm task layout cannot carry one multi-worker training; the message says what to change."""


def _split_top(expr: str) -> list[str]:
    """Split at commas outside brackets: ``a[1-2],b`` -> ``["a[1-2]", "b"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0:
            raise ValueError(f"unbalanced ']' in {expr!r}")
        if ch == "," and depth == 0:
            parts.append(expr[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in {expr!r}")
    parts.append(expr[start:])
    return parts


def _expand_one(name: str) -> list[str]:
    """``n[01-02]-ib[1,3]`` -> every combination, zero padding kept."""
    open_at = name.find("[")
    if open_at < 0:
        if "]" in name:
            raise ValueError(f"unbalanced ']' in {name!r}")
        return [name]
    close_at = name.find("]", open_at)
    if close_at < 0:
        raise ValueError(f"unbalanced '[' in {name!r}")
    prefix, spec, rest = name[:open_at], name[open_at + 1 : close_at], name[close_at + 1 :]
    values: list[str] = []
    for item in spec.split(","):
        match = _RANGE.match(item.strip())
        if not match:
            raise ValueError(f"bad range {item!r} in {name!r}")
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(last) < int(first):
            raise ValueError(f"descending range {item!r} in {name!r}")
        values += [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    return [prefix + v + tail for v in values for tail in _expand_one(rest)]


def expand_hostlist(expr: str) -> list[str]:
    """Slurm's compressed host list (``node[01-03,07],gpu1``) as names, in order.

    Raises:
        ValueError: the expression is malformed.
    """
    if not expr or not expr.strip():
        raise ValueError("empty host list")
    names = [n for part in _split_top(expr.strip()) for n in _expand_one(part.strip())]
    if any(not n for n in names):
        raise ValueError(f"empty host name in {expr!r}")
    return names


def expand_tasks_per_node(expr: str) -> list[int]:
    """``SLURM_STEP_TASKS_PER_NODE`` (``2(x3),1``) as one count per node.

    Raises:
        ValueError: the expression is malformed.
    """
    counts: list[int] = []
    for item in expr.split(","):
        match = _REPEAT.match(item.strip())
        if not match:
            raise ValueError(f"bad tasks-per-node entry {item!r} in {expr!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def task_hosts(nodes: list[str], counts: list[int], distribution: str) -> list[str]:
    """The node of each rank, as srun places tasks (``SLURM_DISTRIBUTION``'s node level).

    block fills each node in turn; cyclic deals ranks round-robin over the nodes that still have
    room (srun's default when there are no more tasks than nodes, where both agree).

    Raises:
        LayoutError: a distribution whose placement is not known here (plane, arbitrary).
    """
    kind = distribution.split(":")[0].split(",")[0]
    if kind == "block":
        return [node for node, count in zip(nodes, counts) for _ in range(count)]
    if kind == "cyclic":
        left, hosts = list(counts), []
        while any(left):
            for i, node in enumerate(nodes):
                if left[i]:
                    hosts.append(node)
                    left[i] -= 1
        return hosts
    raise LayoutError(
        f"srun --distribution={distribution}: where it puts each task is not known here; use the default "
        "(block, or cyclic)"
    )


def job_port_block(job_id: str) -> int:
    """First port of a job's block: a function of its numeric id, the same after a requeue."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + (int(digits) % PORT_BLOCKS) * PORTS_PER_JOB


@dataclass(frozen=True)
class TaskLayout:
    """The tasks of one Slurm job step that train together; this process is ``rank``."""

    rank: int
    hosts: tuple[str, ...]
    ports: tuple[int, ...]
    job_id: str

    @property
    def num_workers(self) -> int:
        return len(self.hosts)

    @property
    def is_chief(self) -> bool:
        """Worker 0 writes the run's files; the others only train."""
        return self.rank == 0

    @property
    def addresses(self) -> list[str]:
        return [f"{h}:{p}" for h, p in zip(self.hosts, self.ports)]

    def describe(self, rank: int) -> str:
        """``worker 1 of 2 (Slurm task 1 on node n02)``: how messages name a worker."""
        return f"worker {rank} of {self.num_workers} (Slurm task {rank} on node {self.hosts[rank]})"

    def check_hosts_resolve(self) -> None:
        """Refuse to start when a node name does not resolve here (workers address each other by it).

        Raises:
            LayoutError: naming the node.
        """
        for host in sorted(set(self.hosts)):
            try:
                socket.getaddrinfo(host, None)
            except OSError as exc:
                raise LayoutError(
                    f"Slurm node name {host!r} does not resolve on {socket.gethostname()} ({exc}); the workers of a "
                    "multi-node training reach each other by node name, so every node name must resolve on every node"
                ) from exc

    def check_port_free(self) -> None:
        """Refuse to start when another program holds this task's port on this node.

        Raises:
            LayoutError: naming the port and the job-id rule that chose it.
        """
        port = self.ports[self.rank]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # TensorFlow's server binds with SO_REUSEADDR as well: a port in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", port))
            except OSError as exc:
                raise LayoutError(
                    f"port {port} for {self.describe(self.rank)} is in use on this node ({exc.strerror}); ports "
                    f"{PORT_BASE}-65535 are given out by job id ({PORTS_PER_JOB} per job), so another program or a "
                    f"job whose id equals {self.job_id} modulo {PORT_BLOCKS} holds it; submit again (a new job id "
                    "gets other ports)"
                ) from exc


def task_layout(runtime: RuntimeInfo) -> Optional[TaskLayout]:
    """The layout of this process's Slurm job step; None outside a step of several tasks.

    Raises:
        LayoutError: Slurm's variables are inconsistent, or the layout cannot be used.
    """
    ntasks = runtime.slurm_step_num_tasks
    if ntasks is None or ntasks <= 1:
        return None
    missing = [
        name
        for name, value in (
            ("SLURM_PROCID", runtime.slurm_procid),
            ("SLURM_STEP_NODELIST", runtime.slurm_step_nodelist),
            ("SLURM_STEP_TASKS_PER_NODE", runtime.slurm_step_tasks_per_node),
            ("SLURM_JOB_ID", runtime.slurm_job_id),
        )
        if value in (None, "")
    ]
    if missing:
        raise LayoutError(f"a Slurm step of {ntasks} tasks without {', '.join(missing)}: run the training through srun")
    assert runtime.slurm_step_nodelist and runtime.slurm_step_tasks_per_node and runtime.slurm_job_id
    assert runtime.slurm_procid is not None
    try:
        nodes = expand_hostlist(runtime.slurm_step_nodelist)
        counts = expand_tasks_per_node(runtime.slurm_step_tasks_per_node)
    except ValueError as exc:
        raise LayoutError(f"cannot read Slurm's task layout: {exc}") from exc
    if len(counts) != len(nodes) or sum(counts) != ntasks:
        raise LayoutError(
            f"Slurm's layout does not add up: {len(nodes)} nodes ({runtime.slurm_step_nodelist}), tasks per node "
            f"{runtime.slurm_step_tasks_per_node}, {ntasks} tasks"
        )
    if max(counts) > PORTS_PER_JOB:
        raise LayoutError(
            f"{max(counts)} tasks on one node; a multi-worker job runs at most {PORTS_PER_JOB} per node "
            "(one per GPU, or one per node using all its GPUs, is TensorFlow's usual layout)"
        )
    hosts = tuple(task_hosts(nodes, counts, runtime.slurm_distribution or "block"))
    rank = runtime.slurm_procid
    if not 0 <= rank < ntasks:
        raise LayoutError(f"SLURM_PROCID={rank} is outside the step's {ntasks} tasks")
    if runtime.slurmd_nodename and hosts[rank] != runtime.slurmd_nodename:
        raise LayoutError(
            f"task {rank} runs on {runtime.slurmd_nodename}, but srun's --distribution="
            f"{runtime.slurm_distribution or 'block'} puts it on {hosts[rank]}; use the default distribution"
        )
    # Up to PORTS_PER_JOB tasks, each rank its own port: tasks on different nodes may still share an
    # address (several slurmd on one host). Beyond that, ports repeat across nodes only.
    local = [hosts[:r].count(hosts[r]) for r in range(ntasks)]
    index = list(range(ntasks)) if ntasks <= PORTS_PER_JOB else local
    base = job_port_block(runtime.slurm_job_id)
    ports = tuple(base + i for i in index)
    return TaskLayout(rank=rank, hosts=hosts, ports=ports, job_id=runtime.slurm_job_id)


def resolve_distribution(choice: Distribution, layout: Optional[TaskLayout]) -> Distribution:
    """``auto`` made concrete for this job step; refuses independent copies in one run.

    Raises:
        LayoutError: ``none`` in a step of several tasks (each would train its own copy).
    """
    choice = Distribution(choice)
    if choice is Distribution.auto:
        return Distribution.multi_worker if layout is not None else Distribution.none
    if choice is Distribution.none and layout is not None:
        raise LayoutError(
            f"this job step runs {layout.num_workers} tasks but train.distribution=none: they would train "
            f"{layout.num_workers} independent copies into one run directory. Use train.distribution=multi_worker "
            "(or auto) for one training across them, or run one task (srun -n 1 / hydra.launcher.tasks_per_node=1 "
            "and hydra.launcher.nodes=1)"
        )
    return choice


# --- what a worker task may write ---------------------------------------------------------------

# Hydra would give every task of a step its own copy of the run directory's .hydra/ files and
# append its log lines to the run's train.log: a worker task logs to its own output instead.
WORKER_HYDRA_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=stdout")


def quiet_worker_config(config: Any) -> None:
    """The same for a composed job config (the launcher's path): no .hydra/, no file log handlers."""
    from omegaconf import open_dict

    with open_dict(config):
        config.hydra.output_subdir = None
        logging_cfg = config.hydra.job_logging
        handlers = logging_cfg.get("handlers") or {}
        files = [name for name in list(handlers) if "filename" in handlers[name]]
        for name in files:
            del handlers[name]
        root = logging_cfg.get("root")
        if root is not None and root.get("handlers") is not None:
            root.handlers = [h for h in root.handlers if h not in files]
