"""What the login node hands the compute node: the tasks a job runs, and the launch they belong to.

The launcher (login node) builds one of these per Slurm task, wraps it in a
:class:`~mnist_hpc.contract.entry.JobEntry` and lets submitit pickle it; the job (compute node)
unpickles it and runs it with the runner its ``RUNNER`` names. They hold data only: which launch,
which job of it, where it writes. How a task is run is the runner's (:mod:`mnist_hpc.compute.job`,
:mod:`mnist_hpc.compute.search`, :mod:`mnist_hpc.login.report.build`): the contract names the
runner (``module:function``, as a console script names its entry point) and never imports the code
that runs it, so neither side depends on the other's internals. A task never carries a model: a
requeued job is the same task again, and resumes from its run directory.

Light: Hydra and OmegaConf at most (both sides import this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

from mnist_hpc.contract.guard import load_private, private_umask
from mnist_hpc.contract.jobconfig import BaseConfig, JobSpec
from mnist_hpc.io import write_bytes_atomic


class LaunchContext:
    """What every job of one launch shares: Hydra's context, the task function, Hydra's singletons,
    and the composed configs the jobs' values apply to (:class:`~mnist_hpc.contract.jobconfig.BaseConfig`).

    Written once per launch into the submitit folder (``launch-<id>.pkl``); each job's pickle
    carries only this file's path and its :class:`~mnist_hpc.contract.jobconfig.JobSpec`, a few
    hundred bytes. On the compute node it is read once per process, on first use.
    """

    def __init__(
        self,
        path: Path,
        hydra_context: Any = None,
        task_function: Any = None,
        singleton_state: Any = None,
        bases: Sequence[BaseConfig] = (),
    ) -> None:
        self.path = Path(path)
        self._content: Optional[tuple[Any, Any, Any, list[BaseConfig]]] = (
            (hydra_context, task_function, singleton_state, list(bases)) if hydra_context is not None else None
        )

    def save(self) -> "LaunchContext":
        """Write the context (login node, once per launch)."""
        import cloudpickle  # submitit's own pickler: the task function may be a local function

        assert self._content is not None, "nothing to save"
        with private_umask():  # 0600 in a 0700 folder whatever the umask: the jobs refuse anything else
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.path, cloudpickle.dumps(self._content))
        return self

    def load(self) -> tuple[Any, Any, Any]:
        """``(hydra_context, task_function, singleton_state)``."""
        return self._loaded()[:3]

    def bases(self) -> list[BaseConfig]:
        """The launch's composed configs, which its jobs' :class:`~mnist_hpc.contract.jobconfig.JobSpec` name."""
        return self._loaded()[3]

    def _loaded(self) -> tuple[Any, Any, Any, list[BaseConfig]]:
        """Raises :class:`~mnist_hpc.contract.guard.UnsafeJobFile` (nothing unpickled) when the file
        or its folder could have been written by someone else."""
        if self._content is None:
            try:
                self._content = load_private(self.path, self.path.parent)
            except FileNotFoundError as exc:
                raise FileNotFoundError(
                    f"this job's launch context {self.path} is gone (was the sweep's .submitit folder "
                    "deleted?); submit the job again"
                ) from exc
        return self._content

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self._content = None


@dataclass
class TrainTrial:
    """One trial of a sweep, alone in its Slurm task or packed with others."""

    RUNNER: ClassVar[str] = "mnist_hpc.compute.job:run_trial"

    context: LaunchContext
    spec: JobSpec
    run_dir: Path
    # Its place in a packed task (hydra.launcher.trials_per_task > 1), as job.json records it.
    packed_slot: Optional[int] = None


@dataclass
class PackedTrials:
    """Several trials of a sweep run one after another in one Slurm task (one TensorFlow import)."""

    RUNNER: ClassVar[str] = "mnist_hpc.compute.job:run_packed"

    trials: list[TrainTrial] = field(default_factory=list)


@dataclass
class SearchWorkerTask:
    """One worker of an asynchronous search: asks the study for trials and trains them until it has its budget."""

    RUNNER: ClassVar[str] = "mnist_hpc.compute.search:run_worker"

    context: LaunchContext
    # Hydra's composed config of the search's submission (each trial is composed from it).
    master_config: Any
    search_dir: Path
    # The search as submitted (mnist_hpc.search.SearchSpec's fields): what the worker trusts. Its
    # search.json, which lies in a directory others may write, gives only a continued budget.
    spec: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportTask:
    """``mnist-hpc-report`` of a sweep, run as a small job once the sweep's tasks have ended."""

    RUNNER: ClassVar[str] = "mnist_hpc.login.report.build:run_report_task"

    sweep_dir: Path


def run_dirs(task: Any) -> list[Path]:
    """The run directories a task writes (where its job records why it could not start)."""
    if isinstance(task, TrainTrial):
        return [task.run_dir]
    if isinstance(task, PackedTrials):
        return [t.run_dir for t in task.trials]
    return []
