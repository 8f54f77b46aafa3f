"""The launcher's options (``hydra.launcher.*``): their one source, and how they reach submitit.

The dataclasses below are the options, their defaults and their meaning. They are registered
in Hydra's ConfigStore as ``hydra/launcher=slurm`` and ``hydra/launcher=local`` (no YAML copy
of the defaults; a site's YAML selects one of them with ``defaults: [slurm]`` and extends it).
:func:`submitit_parameters` derives submitit's keywords from the same fields, so an option
added here reaches submitit without a second list to keep in step.

The launcher's setup converts ``hydra.launcher`` once into its dataclass (:func:`typed`) and
passes that object down: the code that plans, checks and queues reads typed fields, never a
key with a fallback of its own.

Imported during Hydra's plugin discovery: light (no submitit, no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import enum
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from mnist_hpc.config import ConfigError
from mnist_hpc.contract.guard import guarded_python

PLUGIN = "hydra_plugins.mnist_hpc_launcher.launcher"


class GpuRequest(str, enum.Enum):
    """The sbatch spelling of a GPU request (sites accept one or another)."""

    gpus_per_node = "gpus_per_node"
    gres = "gres"
    gpus_per_task = "gpus_per_task"


@dataclass
class LocalQueueConf:
    """Options of the local launcher, and those the Slurm launcher shares (``hydra.launcher.*``)."""

    _target_: str = f"{PLUGIN}.LocalLauncher"
    # Where submitit keeps pickles and logs; %A becomes the job array's id (a single job's id),
    # %j a job's or an array task's own id. One folder per array, not one per task: a
    # 1,000-trial sweep makes one directory, not 1,000, on the shared filesystem.
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%A"
    # Block until every job ends (sweepers that read results need this); default: return when queued.
    wait: bool = False
    # Sweep trials run one after another in each task: TensorFlow's import, the data load and
    # the compiled programs are paid once per task instead of once per trial. auto: packs short
    # trials as far as the free CPUs allow (see mnist_hpc/login/launcher/packing.py); 1: one
    # trial per task; N: N trials per task.
    trials_per_task: str = "auto"
    # Wall-clock limit of each job, in minutes.
    timeout_min: int = 60
    # CPUs per task; TensorFlow's thread pools follow it through SLURM_CPUS_PER_TASK.
    cpus_per_task: int = 2
    # Memory per node in GiB.
    mem_gb: float = 4.0
    # Tasks per node (one training process per task).
    tasks_per_node: int = 1
    # GPUs per node (install the `cuda` extra on GPU clusters); 0: none. How it is spelled to
    # sbatch is gpu_request's.
    gpus_per_node: int = 0
    # Nodes per job.
    nodes: int = 1
    # Job name shown by squeue/sacct.
    name: str = "mnist-hpc"


@dataclass
class SlurmQueueConf(LocalQueueConf):
    """Options of the Slurm launcher; each one of its own reaches submitit as ``slurm_<name>``."""

    _target_: str = f"{PLUGIN}.SlurmLauncher"
    # How many times a job that hit its time limit may requeue itself.
    max_num_timeout: int = 3
    # Slurm partition; null uses the cluster's default.
    partition: Optional[str] = None
    # Slurm account to charge; keep it in your uncommitted site config.
    account: Optional[str] = None
    # Quality of service.
    qos: Optional[str] = None
    # Node feature constraint, e.g. "avx512".
    constraint: Optional[str] = None
    # Nodes to avoid.
    exclude: Optional[str] = None
    # Seconds before the time limit at which Slurm sends USR2 so the job can checkpoint and requeue.
    signal_delay_s: int = 120
    # Trials of a sweep array running at once.
    array_parallelism: int = 256
    # Shell lines run before the job starts, e.g. ["module load python/3.11", "source ~/venv/bin/activate"].
    setup: list[str] = field(default_factory=list)
    # Any other sbatch option, e.g. {mail-type: END, reservation: myres}.
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # How GPUs are asked for, as sites spell it: gpus_per_node (--gpus-per-node=N), gres
    # (--gres=gpu:N) or gpus_per_task (--gpus-per-task=N/tasks_per_node).
    gpu_request: GpuRequest = GpuRequest.gpus_per_node
    # The command that runs Python on the compute node; null: the login node's Python. For a
    # container: "apptainer exec --bind /scratch /path/image.sif python3" (see README).
    python: Optional[str] = None
    # Extra arguments to the srun that starts each task, e.g. ["--container-image=..."] (Pyxis).
    srun_args: list[str] = field(default_factory=list)
    # Start the tasks through srun (false: run Python directly in the batch script, one task).
    use_srun: bool = True
    # Also queue a small job that writes the report (mnist-hpc-report) once every task has
    # ended, failed ones included (--dependency=afterany).
    report_after: bool = False


# Options the launcher itself acts on, never passed to submitit's update_parameters.
LAUNCHER_ONLY = frozenset(
    {"_target_", "submitit_folder", "wait", "trials_per_task", "max_num_timeout", "python", "report_after",
     "gpus_per_node", "gpu_request"}
)
LOCAL_FIELDS = tuple(f.name for f in dataclasses.fields(LocalQueueConf))


def register() -> None:
    """``hydra/launcher=slurm`` and ``hydra/launcher=local`` in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    slurm = OmegaConf.structured(SlurmQueueConf)
    # Hydra composes in struct mode, which would take a new sbatch key into additional_parameters
    # only as `+hydra.launcher.additional_parameters...`; this mapping is open by design (any sbatch
    # option), so it alone is not struct: `hydra.launcher.additional_parameters={hold: true}` works
    # too. Keys sbatch does not know are refused by the site preflight's `sbatch --test-only`.
    OmegaConf.set_struct(slurm.additional_parameters, False)
    store.store(group="hydra/launcher", name="slurm", node=slurm, provider="mnist_hpc")
    store.store(group="hydra/launcher", name="local", node=LocalQueueConf, provider="mnist_hpc")


def typed(node: Any, cluster: str, sweep_dir: Path) -> LocalQueueConf:
    """``hydra.launcher`` (a node of the composed config, or a mapping) as its dataclass: a
    :class:`SlurmQueueConf` for ``slurm``, a :class:`LocalQueueConf` otherwise, every option
    checked and every unset one the dataclass's default.

    Interpolations resolve where ``node`` sits in the config, except ``${hydra.sweep.dir}`` in
    ``submitit_folder``: it becomes ``sweep_dir`` (absolute), where the launch puts its trials.
    """
    schema = SlurmQueueConf if cluster == "slurm" else LocalQueueConf
    node = node if OmegaConf.is_config(node) else OmegaConf.create(node)
    raw = OmegaConf.to_container(node, resolve=False)
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(raw, dict) and isinstance(values, dict)
    folder = str(raw["submitit_folder"]) if "submitit_folder" in raw else schema.submitit_folder
    values["submitit_folder"] = folder.replace("${hydra.sweep.dir}", str(sweep_dir))
    try:
        options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except ConfigKeyError as exc:  # a key forced in with +hydra.launcher.KEY=..., or one of the other launcher's
        valid = ", ".join(f.name for f in dataclasses.fields(schema) if f.name != "_target_")
        raise ConfigError(f"unknown launcher option hydra.launcher.{exc.full_key}; the {cluster} launcher's options are: "
                          f"{valid} (docs/configuration.md); any other sbatch option goes in additional_parameters") from None
    except ValidationError as exc:
        raise ConfigError(f"invalid launcher option hydra.launcher.{exc.full_key}: {str(exc.msg).splitlines()[0]}") from None
    assert isinstance(options, schema)
    return options


def tasks_per_job(conf: LocalQueueConf) -> int:
    """Slurm tasks each job runs: ``nodes`` x ``tasks_per_node`` (several train one run together)."""
    return conf.nodes * conf.tasks_per_node


def gpu_request(conf: LocalQueueConf) -> GpuRequest:
    """How GPUs are spelled to the scheduler (the local launcher has no such option: per node)."""
    return conf.gpu_request if isinstance(conf, SlurmQueueConf) else GpuRequest.gpus_per_node


def uses_srun(conf: LocalQueueConf) -> bool:
    """Whether a job's tasks start through srun (Slurm only)."""
    return isinstance(conf, SlurmQueueConf) and conf.use_srun


def submitit_parameters(conf: LocalQueueConf, cluster: str) -> dict[str, Any]:
    """Translate ``hydra.launcher`` into ``AutoExecutor.update_parameters`` keywords.

    Shared options keep their name; the Slurm launcher's own become ``slurm_<name>``. Unset
    values (None, an empty list or mapping) are left to submitit's defaults.
    """
    params: dict[str, Any] = {}
    for option in dataclasses.fields(conf):
        key, value = option.name, getattr(conf, option.name)
        if key in LAUNCHER_ONLY or value is None or value == [] or value == {}:
            continue
        if key in LOCAL_FIELDS:
            params[key] = value
        elif cluster == "slurm":
            params[f"slurm_{key}"] = value
    params.update(gpu_parameters(conf, cluster))
    if cluster == "slurm" and isinstance(conf, SlurmQueueConf) and uses_srun(conf):
        params["slurm_srun_args"] = task_srun_args(conf) + list(conf.srun_args)
    if cluster == "slurm" and isinstance(conf, SlurmQueueConf):
        params.update(batch_lines(conf))
    return params


def batch_lines(conf: "SlurmQueueConf") -> dict[str, Any]:
    """The batch script's own lines after the user's setup lines, in this order:

    - the guard's: no empty ``PYTHONPATH`` element, whatever a setup line made of it (it would put
      the working directory on the path while the job's Python starts, before the guard runs;
      :data:`mnist_hpc.contract.guard.PYTHON_PATH_SETUP`);
    - the requeue helper (see :mod:`mnist_hpc.contract.requeue`). Every Slurm job gets it: whether
      the job's Python can run ``scontrol`` (a container without Slurm's client cannot) is only
      known on the node.
    """
    from mnist_hpc.contract import requeue
    from mnist_hpc.contract.guard import PYTHON_PATH_SETUP

    return {"slurm_setup": list(conf.setup) + list(PYTHON_PATH_SETUP) + requeue.setup_lines(conf.submitit_folder),
            "slurm_teardown": requeue.teardown_lines()}


# After one task of a multi-task step ends, srun gives the others this long to end on their own
# (a worker whose peer died records why within seconds) before it ends them: no task can hold
# the job until its time limit.
SRUN_WAIT_S = 60


def task_srun_args(conf: LocalQueueConf) -> list[str]:
    """What the srun that starts the tasks must be told (before the user's ``srun_args``).

    Since Slurm 22.05 srun no longer takes ``--cpus-per-task`` from the job: without it each
    task's step gets one CPU, and with task binding TensorFlow's pools (sized by
    SLURM_CPUS_PER_TASK) would share it.
    """
    args = [f"--cpus-per-task={conf.cpus_per_task}"]
    if tasks_per_job(conf) > 1:
        args.append(f"--wait={SRUN_WAIT_S}")
    return args


def gpu_parameters(conf: LocalQueueConf, cluster: str) -> dict[str, Any]:
    """The GPU request in the spelling ``gpu_request`` names (nothing when no GPU is asked for)."""
    gpus = conf.gpus_per_node
    if gpus <= 0:
        return {}
    spelling = gpu_request(conf)
    if cluster != "slurm" or spelling is GpuRequest.gpus_per_node:
        return {"gpus_per_node": gpus}
    if spelling is GpuRequest.gres:
        return {"slurm_gres": f"gpu:{gpus}"}
    return {"slurm_gpus_per_task": max(1, gpus // conf.tasks_per_node)}


def executor_init(conf: LocalQueueConf, cluster: str) -> dict[str, Any]:
    """Keywords for ``submitit.AutoExecutor`` itself (not its ``update_parameters``).

    Every job's command goes through :mod:`mnist_hpc.contract.guard`, which checks the job's
    files before anything is unpickled: submitit's ``python`` becomes ``<python> -u -c
    <guard.JOB_COMMAND>``, after which submitit puts ``-u -m submitit.core._submit <folder>``.
    """
    if not isinstance(conf, SlurmQueueConf) or cluster != "slurm":
        return {f"{cluster}_python": guarded_python(shlex.quote(sys.executable))}
    python = conf.python or shlex.quote(sys.executable)
    return {"slurm_max_num_timeout": conf.max_num_timeout, "slurm_python": guarded_python(python)}
