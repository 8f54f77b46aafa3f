"""Slurm's warning signals: stop at the next step boundary, checkpoint, then requeue or exit.

Slurm sends USR2 ``--signal=USR2@<s>`` seconds before a job's time limit (and, on many
clusters, on preemption), and SIGTERM when it cancels or preempts a job. A handler that acted
at once would interrupt TensorFlow mid-call and lose everything since the last checkpoint.
Instead, while training runs, :class:`StopRequest` only records the signal; the training loop
looks at it after every compiled call (a step boundary), agrees on it with the other workers,
writes a checkpoint there and raises :class:`TrainingInterrupted`. What happens next belongs
to whoever started the training:

- a job submitted through the launcher (:mod:`mnist_hpc.compute.job`): submitit's
  own USR2 handler then runs (checkpointable resubmission, requeue counting, ``scontrol
  requeue``); where the job's Python cannot run ``scontrol`` (a container without Slurm's
  client), the batch script requeues it (:func:`requeue_job`);
- a run started in a plain sbatch script, srun or a shell (Hydra's run mode):
  :func:`mnist_hpc.compute.run.finish_in_process` requeues the job itself on USR2 under Slurm,
  or exits so that the run can be started again in the same directory.

SIGTERM never requeues: it means cancel or preempt, and Slurm itself requeues a job it
preempts under ``PreemptMode=REQUEUE``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from mnist_hpc.config import Config

log = logging.getLogger(__name__)

# The signals a run acts on at its next step boundary.
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped at a step boundary on a signal, after its checkpoint was written.

    Not a failure: the run resumes from ``checkpoint`` when it starts again in its directory.
    """

    def __init__(self, signum: int, epoch: int, batch: int, checkpoint: Optional[Path]) -> None:
        self.signum = signum
        self.epoch = epoch
        self.batch = batch
        self.checkpoint = checkpoint
        where = f"{epoch} epoch(s) and {batch} batch(es) done"
        saved = f", checkpoint {checkpoint.name}" if checkpoint is not None else ""
        super().__init__(f"training stopped on {signal.Signals(signum).name} at a step boundary ({where}{saved})")

    @property
    def requeue(self) -> bool:
        """USR2 asks for a requeue (time limit, preemption warning); SIGTERM does not."""
        return self.signum == signal.SIGUSR2

    @property
    def exit_code(self) -> int:
        """128 + the signal, as a process the signal ended would report."""
        return 128 + self.signum


class StopRequest:
    """Records USR2/SIGTERM while installed; the training loop reads it at step boundaries.

    A context manager: handlers are installed on entry and the previous ones (submitit's, or
    the defaults) restored on exit, so the signal reaches them once training has ended. A job
    installs one for its whole call, so that a warning that comes between two trials of a
    packed task, or before training starts, is kept for the next step boundary; a training
    inside it shares it (entering again returns the active one). ``ignore_after``: once the
    work ended without an error, a late USR2 is ignored instead of restored to a handler that
    would requeue (or, by default, kill) a process that has only to exit.
    Signal handlers only run in the main thread; elsewhere (a test calling training from a
    thread) nothing is installed and :attr:`signum` stays None.
    """

    _active: Optional["StopRequest"] = None

    def __init__(self, ignore_after: bool = False) -> None:
        self.signum: Optional[int] = None
        self.ignore_after = ignore_after
        self._previous: dict[int, Any] = {}
        self._shared = False

    def _record(self, signum: int, frame: Optional[FrameType]) -> None:
        # SIGTERM (cancel, preemption) overrides an earlier USR2: no requeue then.
        if self.signum is None or signum == signal.SIGTERM:
            self.signum = signum
        log.warning("received %s: stopping at the next step boundary", signal.Signals(signum).name)

    def __enter__(self) -> "StopRequest":
        active = StopRequest._active
        if active is not None:
            self._shared = True
            return active
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread
                break
        StopRequest._active = self if self._previous else None
        return self

    def __exit__(self, exc_type: Optional[type], *exc: object) -> None:
        if self._shared:
            return
        StopRequest._active = None
        for sig, previous in self._previous.items():
            ignore = self.ignore_after and exc_type is None and sig == signal.SIGUSR2
            signal.signal(sig, signal.SIG_IGN if ignore else previous)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @staticmethod
    def handler_before(sig: int) -> Any:
        """The handler ``sig`` had before the active request took it (submitit's), or its current one."""
        active = StopRequest._active
        if active is not None and sig in active._previous:
            return active._previous[sig]
        return signal.getsignal(sig)


def hand_over(signum: int, submitit_handler: Any, chief: bool) -> BaseException:
    """A job stopped on ``signum`` at a step boundary (its checkpoint written) or between trials: requeue or exit.

    On USR2 the chief hands over to submitit's handler, which requeues the job through the
    callable's ``checkpoint`` and exits (``SystemExit``), or raises ``UncompletedJobError`` when
    no requeue is left (returned here, to be recorded like any time-out). When submitit's own
    ``scontrol requeue`` fails (after it wrote the resubmission), :func:`requeue_job` tries again,
    through the batch script where this Python cannot run ``scontrol``; if that fails too, a
    :class:`~mnist_hpc.compute.failures.NotRequeued` that says why is returned. Otherwise
    (SIGTERM: cancel or preemption, which Slurm requeues itself) the chief exits; a worker that
    is not the chief always leaves as :func:`worker_exit` says.
    """
    from submitit.core.utils import UncompletedJobError

    if not chief:
        worker_exit(signum)
    if signum == signal.SIGUSR2 and callable(submitit_handler):
        from mnist_hpc.compute.failures import NotRequeued
        from mnist_hpc.contract.guard import private_umask

        try:
            # submitit rewrites the job's pickle for the requeue: private, or the requeued job refuses it.
            with private_umask():
                submitit_handler(signal.SIGUSR2, None)
        except UncompletedJobError as exc:
            return exc
        except (OSError, subprocess.SubprocessError) as exc:
            if not _scontrol_failed(exc):
                raise  # not its `scontrol requeue` (writing the resubmission, say): a bug or a known error, as before
            job_id = os.environ.get("SLURM_JOB_ID")
            log.warning("submitit could not requeue the job itself (%s); trying again", exc)
            from mnist_hpc.contract.guard import JOB_FOLDER_ENV

            # submitit's own variable (the folder the guard checked and pinned), and its name for messages.
            folder, shown = os.environ.get("SUBMITIT_FOLDER"), os.environ.get(JOB_FOLDER_ENV)
            refused = requeue_job(job_id, folder, shown) if job_id else "not a Slurm job"
            if refused is not None:
                return NotRequeued(f"Slurm job {job_id} was not requeued: {refused}")
            log.warning("requeued Slurm job %s", job_id)
    sys.exit(128 + signum)


def worker_exit(signum: int) -> NoReturn:
    """A worker that is not the chief, stopped at a step boundary with the others: exit 0.

    The chief speaks for the job (its checkpoint, its requeue, its exit code). A worker that
    left first with ``128 + signal`` would, on clusters with ``KillOnBadExit=1`` (or ``srun
    --kill-on-bad-exit``), make Slurm kill the chief before its checkpoint or its requeue.
    """
    log.warning("stopped on %s at a step boundary with the other workers; the chief (task 0) checkpoints and "
                "ends or requeues the job", signal.Signals(signum).name)
    sys.exit(0)


def _scontrol_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is submitit's ``scontrol`` call failing (not found, not runnable, non-zero, timed out).

    submitit runs it last, after it wrote the resubmission (pinned in tests/test_requeue_helper.py).
    """
    command = getattr(exc, "cmd", None)
    if isinstance(exc, subprocess.SubprocessError) and isinstance(command, (list, tuple)) and command:
        return Path(str(command[0])).name == "scontrol"
    return isinstance(exc, OSError) and Path(str(exc.filename or "")).name == "scontrol"


# scontrol's exit status when the shell (or a container's wrapper) cannot find or run it.
_CANNOT_RUN = (126, 127)


def requeue_job(job_id: str, submitit_folder: Optional[str] = None, shown_folder: Optional[str] = None) -> Optional[str]:
    """Ask Slurm to requeue ``job_id`` (it then ends this attempt); the reason if it did not.

    ``scontrol requeue`` first; where it cannot run here (a container without Slurm's client),
    the batch script of a launcher's job (``submitit_folder``: the job's; ``shown_folder``: its
    name for messages) asks on this job's behalf (:mod:`mnist_hpc.contract.requeue`). A refusal
    from Slurm itself is final.
    """
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        cannot = f"scontrol cannot run here ({exc})"
    else:
        said = " ".join((done.stderr or done.stdout).split())
        if done.returncode == 0:
            return None
        if done.returncode not in _CANNOT_RUN:
            return f"Slurm refused: {said}" if said else f"scontrol requeue exited with {done.returncode}"
        cannot = f"scontrol cannot run here (exit status {done.returncode}{': ' + said if said else ''})"
    if not submitit_folder:
        return f"{cannot}, and no batch script of the launcher's can do it for this run"
    from mnist_hpc.contract.requeue import ask_batch_script

    refused = ask_batch_script(submitit_folder, job_id, shown_folder=shown_folder)
    return None if refused is None else f"{cannot}; {refused}"
