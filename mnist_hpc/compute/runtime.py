"""The process a job runs in: Slurm allocation and host, TensorFlow's set-up, and provenance.

Read once at the entry point; stage functions take a :class:`RuntimeInfo` instead of reading
environment variables themselves.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional

from mnist_hpc.config import TrainConfig
from mnist_hpc.contract.guard import JOB_FOLDER_ENV

log = logging.getLogger(__name__)


def _int_or_none(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def _cpus_allowed() -> Optional[int]:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None


@dataclass(frozen=True)
class RuntimeInfo:
    hostname: str
    slurm_job_id: Optional[str] = None
    slurm_array_job_id: Optional[str] = None
    slurm_array_task_id: Optional[str] = None
    slurm_cpus_per_task: Optional[int] = None
    slurm_restart_count: int = 0
    # The job step this process is a task of (srun sets these; a batch script's own shell has
    # none of the STEP ones, so a process started there is alone whatever --ntasks says).
    slurm_procid: Optional[int] = None
    slurm_step_num_tasks: Optional[int] = None
    slurm_step_nodelist: Optional[str] = None
    slurm_step_tasks_per_node: Optional[str] = None
    slurm_localid: Optional[int] = None
    slurmd_nodename: Optional[str] = None
    slurm_distribution: Optional[str] = None
    # CPUs this process may run on (its affinity mask): what Slurm's task binding really gave it.
    cpus_allowed: Optional[int] = None
    # submitit's folder for this job's pickles and logs (%j, %A unexpanded); None outside submitit.
    submitit_folder: Optional[str] = None

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "RuntimeInfo":
        env = os.environ if environ is None else environ
        return cls(
            hostname=socket.gethostname(),
            slurm_job_id=env.get("SLURM_JOB_ID") or None,
            slurm_array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
            slurm_array_task_id=env.get("SLURM_ARRAY_TASK_ID") or None,
            slurm_cpus_per_task=_int_or_none(env.get("SLURM_CPUS_PER_TASK")),
            slurm_restart_count=_int_or_none(env.get("SLURM_RESTART_COUNT")) or 0,
            slurm_procid=_int_or_none(env.get("SLURM_PROCID")),
            slurm_step_num_tasks=_int_or_none(env.get("SLURM_STEP_NUM_TASKS")),
            slurm_step_nodelist=env.get("SLURM_STEP_NODELIST") or None,
            slurm_step_tasks_per_node=env.get("SLURM_STEP_TASKS_PER_NODE") or None,
            slurm_localid=_int_or_none(env.get("SLURM_LOCALID")),
            slurmd_nodename=env.get("SLURMD_NODENAME") or None,
            slurm_distribution=env.get("SLURM_DISTRIBUTION") or None,
            cpus_allowed=_cpus_allowed(),
            # As the launcher named it (the guard hands submitit a name through a descriptor).
            submitit_folder=env.get(JOB_FOLDER_ENV) or env.get("SUBMITIT_FOLDER") or None,
        )

    def task_log(self, task: int) -> str:
        """Where Slurm task ``task`` of this job writes its log: submitit's per-task file, or the job's output."""
        if self.submitit_folder and self.slurm_job_id:
            from submitit.core.utils import JobPaths  # its own expansion of %j, %A, %a, %t

            return str(JobPaths(self.submitit_folder, job_id=self.job_label or self.slurm_job_id, task_id=task).stderr)
        return "the job's output file (sbatch --output)"

    @property
    def is_worker_task(self) -> bool:
        """A task other than the first of a multi-task step: it never writes the run's files."""
        return (self.slurm_step_num_tasks or 1) > 1 and (self.slurm_procid or 0) > 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def job_label(self) -> Optional[str]:
        """The job as squeue shows it: ``1234_5`` for an array task, else the job id."""
        if self.slurm_array_job_id and self.slurm_array_task_id:
            return f"{self.slurm_array_job_id}_{self.slurm_array_task_id}"
        return self.slurm_job_id


def configure_tensorflow(train: TrainConfig, runtime: RuntimeInfo) -> dict[str, Optional[int]]:
    """Quiet TensorFlow's start-up logging, size its thread pools, set determinism.

    Threads follow the Slurm allocation (``SLURM_CPUS_PER_TASK``) unless the config sets them:
    TensorFlow otherwise sizes its pools by the node's cores and oversubscribes a shared node.
    """
    tf = import_tensorflow()
    intra = train.intra_op_threads or runtime.slurm_cpus_per_task
    inter = train.inter_op_threads or runtime.slurm_cpus_per_task
    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        # The runtime was already initialised in this process (a second run in one interpreter).
        log.warning("TensorFlow already initialised; keeping its thread pools as they are")
    gpu_memory_growth(tf)
    if train.deterministic:
        tf.config.experimental.enable_op_determinism()
    return {
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or None,
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or None,
    }


# Installed alongside, imported by TensorFlow and Keras only for notebooks and plotting (Keras'
# file editor, image galleries); they cost a job ~0.7 s of start-up (benchmarks/results/breakdown.md).
NOT_FOR_JOBS = ("IPython", "matplotlib")


def import_tensorflow() -> Any:
    """TensorFlow (and Keras), imported the way a job needs them; the module.

    - C++ INFO/WARNING lines (oneDNN notices, CPU feature hints) are noise in a job log.
    - :data:`NOT_FOR_JOBS` are hidden while TensorFlow and Keras import (both import them inside
      ``try: ... except ImportError``); they import normally afterwards, for anything that wants them.
    - Then every object alive is frozen out of the garbage collector's reach: the ~370,000 objects
      of TensorFlow's modules live as long as the process, and a full collection (which Keras'
      ``clear_session`` runs between packed trials) no longer walks them (0.2 s each time).
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    hidden = [name for name in NOT_FOR_JOBS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        import keras  # noqa: F401  (its file editor and galleries are what try IPython and matplotlib)
        import tensorflow as tf
    finally:
        for name in hidden:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]
    gc.freeze()
    return tf


def gpu_memory_growth(tf: Any) -> list[str]:
    """Let every visible GPU's memory grow as needed instead of being taken whole at start-up.

    Packed trials run one after another in one process, and several tasks may share a node's
    GPUs: without growth the first TensorFlow context takes (almost) all of a GPU's memory.
    Returns the GPUs set; on a CPU node, none.
    """
    done = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            # Already initialised in this process (a second trial): growth was set by the first.
            if not tf.config.experimental.get_memory_growth(gpu):
                log.warning("%s was initialised without memory growth; it keeps its whole memory", gpu.name)
                continue
        done.append(gpu.name)
    return done


def _dist_version(*names: str) -> Optional[str]:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def git_commit(start: Path) -> Optional[dict[str, Any]]:
    """The commit of the checkout holding ``start``, if it is one (local git only, no network)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(start), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(start), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(runtime: RuntimeInfo, data_sha256: str, started: str, ended: Optional[str]) -> dict[str, Any]:
    """Versions, host, Slurm ids, data hash, code commit and times of a run."""
    import keras
    import numpy
    import tensorflow as tf

    return {
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": numpy.__version__,
            "hydra": _dist_version("hydra-core"),
            "omegaconf": _dist_version("omegaconf"),
            "submitit": _dist_version("submitit"),
            "mnist_hpc": _dist_version("mnist-hpc"),
        },
        "python_executable": sys.executable,
        "platform": platform.platform(),
        **runtime.as_dict(),
        "data_sha256": data_sha256,
        "git": git_commit(Path(__file__).resolve().parent),
        "started": started,
        "ended": ended,
    }
