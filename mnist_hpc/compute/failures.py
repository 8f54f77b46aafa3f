"""How a run that cannot go on says so: one line with the fix for known errors, tracebacks for bugs.

Known errors are the ones a user causes or can mend (a missing or damaged cache, a damaged
checkpoint, a directory that belongs to another run, a full or read-only disk, a batch that
does not fit in memory, a job out of requeues). Each becomes one message that names what is
wrong and what to do: printed alone (no traceback), written into ``failure.json`` for
submitted runs, and the process exits non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from pathlib import Path
from typing import Iterator, Optional

from hydra.errors import CompactHydraException

from mnist_hpc import claim, rundir
from mnist_hpc.cache import CacheError
from mnist_hpc.config import ConfigError
from mnist_hpc.dataset import DatasetError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class RequeueLimitReached(RuntimeError):
    """Slurm's time-limit warning came after the job had used all its requeues."""


class NotRequeued(RuntimeError):
    """Training stopped at its checkpoint on Slurm's warning, and the job could not be requeued."""


class PackedTrialsFailed(RuntimeError):
    """Some trials of a packed task failed (each has its own failure.json); the others finished."""


class RunError(CompactHydraException):
    """A known error of an in-process run: Hydra prints its message alone and exits 1."""


def unwrap(error: BaseException) -> BaseException:
    """The known error itself, behind the one-line :class:`RunError` the Hydra task raised for it."""
    return error.__cause__ if isinstance(error, RunError) and error.__cause__ is not None else error


def known_error(exc: BaseException) -> Optional[str]:
    """The one-line message for a known error (with what to do), or None for a bug."""
    from mnist_hpc.compute.checkpoint import CheckpointError
    from mnist_hpc.compute.distribute import WorkerFailure
    from mnist_hpc.contract.guard import UnsafeJobFile
    from mnist_hpc.compute.tensorboard import TensorBoardError

    if isinstance(exc, (CacheError, DatasetError, ConfigError, CheckpointError, WorkerFailure, TensorBoardError, UnsafeJobFile)):
        return str(exc)
    if isinstance(exc, (claim.RunConflict, RequeueLimitReached, NotRequeued, PackedTrialsFailed)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        where = f" writing {exc.filename}" if exc.filename else ""
        return (
            f"no space left on the device{where} ({exc.strerror}); free space there (or raise your quota) and run "
            "again with the same overrides and directory: the run resumes from its last checkpoint"
        )
    if isinstance(exc, OSError) and exc.errno in _NOT_WRITABLE:
        where = f" {exc.filename}" if exc.filename else " the run directory"
        return f"cannot write{where} ({exc.strerror}); set paths.output_root (or hydra.run.dir) to a writable place"
    if isinstance(exc, MemoryError) or _is_tf_out_of_memory(exc):
        return (
            "ran out of memory; lower train.batch_size, or ask for more memory (hydra.launcher.mem_gb) "
            f"({type(exc).__name__})"
        )
    return None


def _is_tf_out_of_memory(exc: BaseException) -> bool:
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(exc, tf.errors.ResourceExhaustedError)


def record_failure(run_dir: Path, exc: BaseException, keep_existing: bool = False) -> None:
    """``failure.json`` in the run directory; a job that cannot even write it still fails, loudly.

    A refusal to use the directory (:class:`~mnist_hpc.claim.RunConflict`) is not the run's
    failure: it is not written into the directory, which belongs to another run.
    ``keep_existing``: see :func:`mnist_hpc.rundir.write_failure` (a worker that is not the chief).
    """
    if isinstance(exc, claim.RunConflict):
        return
    try:
        rundir.write_failure(run_dir, exc, keep_existing=keep_existing)
    except OSError as write_error:
        print(f"mnist-hpc: could not write {rundir.FAILURE_FILE} into {run_dir}: {write_error}", file=sys.stderr)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Around what a job runs: a known error ends the process in one line and exit 1 (:func:`exit_on`)."""
    try:
        yield
    except Exception as exc:  # known errors end in one line, bugs keep their traceback
        exit_on(exc)


def exit_on(exc: BaseException) -> None:
    """End a job's process on ``exc``: one line and exit 1 for a known error; a bug keeps its traceback."""
    message = known_error(exc)
    if message is None:
        raise exc
    print(f"{rundir.ERROR_LINE_PREFIX}{message}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None
