"""The one object submitit unpickles on a compute node: stable, builtins inside, and loud on mismatch.

submitit unpickles what it runs before any of our code runs, so a job whose pickle refers to a
class the compute node's environment does not have (another mnist-hpc, Hydra, OmegaConf or
Python than the login node's) would die with an ``AttributeError`` in submitit's own code and
leave no word in its run directory. :class:`JobEntry` holds only builtins: the versions the job
was prepared with, its run directories, and its task (:mod:`mnist_hpc.contract.tasks`) as
pickled bytes. Its ``__call__`` unpickles those bytes itself, so a failure becomes a
``failure.json`` in every run directory (written by the job's first task) that names the versions
that differ; then it runs the task with the runner the task names (:func:`runner`).

Only the standard library is imported at module level: this module must import anywhere.
"""

from __future__ import annotations

import os
import pickle
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

# The distributions whose versions must match between the login node and the compute node.
DISTRIBUTIONS = ("mnist-hpc", "hydra-core", "omegaconf", "submitit", "cloudpickle")


def environment_versions() -> dict[str, Optional[str]]:
    """Python's version and those of :data:`DISTRIBUTIONS` in this process's environment."""
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def version_differences(prepared: dict[str, Optional[str]], here: dict[str, Optional[str]]) -> list[str]:
    return [f"{k} {prepared.get(k)} (login node) vs {here.get(k)} (here)" for k in prepared if prepared.get(k) != here.get(k)]


def end_with_local_controller() -> None:
    """A task of the local launcher stops (as on SIGTERM) when the job's controller process dies.

    The local launcher's job is submitit's controller process (its job id is that pid), which
    starts the task process that trains. A controller killed with ``kill -9`` cannot pass a
    signal on: without this the task would train on, orphaned, where status sees a dead job. With
    the kernel's parent-death signal, the controller's pid alone says whether the job lives.
    """
    controller = os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    if not controller or not controller.isdigit() or "SLURM_JOB_ID" in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    # The controller is the parent, and the job id too unless the controller was started by a shell.
    if not os.environ.get("SUBMITIT_LOCAL_WITH_SHELL") and os.getppid() != int(controller):
        os.kill(os.getpid(), signal.SIGTERM)  # it died before the request was in place


class JobUnloadable(RuntimeError):
    """The job's pickle cannot be loaded here (the environment differs from the login node's)."""


def runner(task: Any) -> Any:
    """The function that runs ``task``: the one its ``RUNNER`` names (``module:function``), or the
    task itself when it is a plain callable.

    The contract names its runners instead of importing them: the compute side's code (and the
    login side's, for a report) is imported by the job that runs it, and by nothing here.
    """
    name = getattr(type(task), "RUNNER", None)
    if name is None:
        return lambda task: task()
    import importlib

    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


class JobEntry:
    """What submitit runs: checks the environment, unpickles its task, runs it with the task's runner.

    Checkpointable: a requeue runs this same entry again, and the task resumes from its run
    directories. The runners end a known error in one line (exit 1) and keep a bug's traceback.
    """

    def __init__(self, job: Any, run_dirs: Sequence[Path], versions: Optional[dict[str, Optional[str]]] = None) -> None:
        self.payload = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        self.run_dirs = [str(d) for d in run_dirs]
        self.versions = versions or environment_versions()

    def load(self) -> Any:
        """The real job.

        Raises:
            JobUnloadable: its pickle refers to code this environment lacks or has in another form.
        """
        try:
            return pickle.loads(self.payload)
        except Exception as exc:  # any unpickling error: missing module, class, attribute, bad state
            differ = version_differences(self.versions, environment_versions())
            why = f" ({'; '.join(differ)})" if differ else ""
            raise JobUnloadable(
                f"this job was prepared on the login node with another environment than this node's{why}: "
                f"its pickle cannot be loaded ({type(exc).__name__}: {exc}). Run jobs with the same Python and "
                "packages as the login node (activate the same venv or modules in hydra.launcher.setup), "
                "then submit again"
            ) from exc

    def __call__(self) -> Any:
        from mnist_hpc.contract.guard import apply_user_umask, check_started_job

        end_with_local_controller()
        # Done already by the job's command (mnist_hpc.contract.guard) before its pickle was read;
        # a job started another way (an older script run by hand) is refused here, before its payload.
        check_started_job()
        apply_user_umask()  # its run directories follow the user's umask (a group's project stays shared)
        try:
            job = self.load()
        except JobUnloadable as exc:
            from mnist_hpc import rundir

            # Every task of a multi-task job fails alike; the first one says so.
            for run_dir in self.run_dirs if os.environ.get("SLURM_PROCID", "0") == "0" else []:
                try:
                    rundir.write_failure(Path(run_dir), exc)
                except OSError:
                    pass
            print(f"{rundir.ERROR_LINE_PREFIX}{exc}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        return runner(job)(job)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The resubmission after a timeout or preemption: this entry again (the job resumes from disk)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)
