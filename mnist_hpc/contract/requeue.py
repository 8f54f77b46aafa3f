"""Requeue a job whose Python cannot run ``scontrol``: the batch script, on the host, does it for the job.

A job whose ``hydra.launcher.python`` is a container without Slurm's client (an Apptainer image,
a Pyxis one) checkpoints on Slurm's USR2 warning, but cannot run ``scontrol requeue`` itself.
Its batch script runs on the host, where ``scontrol`` is. So the launcher adds to every Slurm
batch script a small helper (:func:`setup_lines`): two FIFOs in the job's private submitit folder
and a background shell that waits for one request on the first (a blocking read: no polling),
runs ``scontrol requeue $SLURM_JOB_ID`` and writes Slurm's answer into the second. The job asks
(:func:`ask_batch_script`) only when its own ``scontrol`` cannot run. Both sides find the FIFOs
from the two facts they share: the submitit folder (the job's command names it; any container
that runs the job sees it, since the job's pickles are there) and the Slurm job id.

The FIFOs are the user's alone (``mkfifo -m 600`` in the folder the launcher made 0700); the job
refuses a FIFO that is not (see :mod:`.guard`). :func:`teardown_lines` ends the helper and removes
the FIFOs after the job's command, and keeps the command's exit status as the script's.

Only the standard library at module level.
"""

from __future__ import annotations

import errno
import os
import select
import shlex
import stat
import time
from pathlib import Path
from typing import Optional

from mnist_hpc.contract.guard import WRITABLE_BY_OTHERS

# The FIFOs' names in the anchor of the submitit folder (<sweep>/.submitit): <prefix><job id><suffix>.
FIFO_PREFIX = ".requeue-"
ASK_SUFFIX = ".ask"
ANSWER_SUFFIX = ".answer"
# The one request the helper acts on.
REQUEST = "requeue"
# How long the job waits for Slurm's answer through the helper (submitit gives scontrol 60 s).
ANSWER_WAIT_S = 90.0

_SHELL_BASE = "mnist_hpc_requeue"  # the batch script's variable holding the FIFOs' common path
_SHELL_PID = "mnist_hpc_requeue_pid"
_SHELL_STATUS = "mnist_hpc_status"


def _anchor(folder: str) -> Path:
    """The fixed part of a submitit folder (``<sweep>/.submitit`` for ``<sweep>/.submitit/%A``)."""
    from submitit.core.utils import JobPaths

    return Path(JobPaths.get_first_id_independent_folder(folder))


def fifo_base(folder: str, job_id: str) -> Path:
    """The FIFOs' common path (without suffix) for Slurm job ``job_id`` (its ``SLURM_JOB_ID``)."""
    return _anchor(folder) / f"{FIFO_PREFIX}{job_id}"


def setup_lines(folder: str) -> list[str]:
    """Batch-script lines (after the user's setup: scontrol may come from a module) that start the helper.

    ``folder``: the submitit folder as the job's command names it (absolute, ``%A``/``%j`` kept).
    A FIFO left by an earlier attempt of the same job (requeued, so never torn down) is replaced.
    """
    base = f"{shlex.quote(str(_anchor(folder)))}/{FIFO_PREFIX}$SLURM_JOB_ID"
    ask, answer = f'"${_SHELL_BASE}{ASK_SUFFIX}"', f'"${_SHELL_BASE}{ANSWER_SUFFIX}"'
    return [
        "# mnist-hpc: requeues this job when its Python cannot run scontrol (mnist_hpc/contract/requeue.py)",
        f"{_SHELL_BASE}={base}",
        f"rm -f {ask} {answer}",
        f"if mkfifo -m 600 {ask} {answer}; then",
        f"    {{ read -r ask < {ask} && [ \"$ask\" = {REQUEST} ] && "
        f"{{ answer=$(scontrol requeue \"$SLURM_JOB_ID\" 2>&1); echo \"$? $answer\" > {answer}; }}; }} &",
        f"    {_SHELL_PID}=$!",
        "fi",
    ]


def teardown_lines() -> list[str]:
    """Batch-script lines after the job's command: end the helper, remove its FIFOs, exit as the command did."""
    return [
        f"{_SHELL_STATUS}=$?",
        f"[ -n \"${{{_SHELL_PID}:-}}\" ] && kill \"${_SHELL_PID}\" 2>/dev/null",
        f"rm -f \"${_SHELL_BASE}{ASK_SUFFIX}\" \"${_SHELL_BASE}{ANSWER_SUFFIX}\"",
        f"exit ${_SHELL_STATUS}",
    ]


def _fifo_problem(fd: int, path: Path) -> Optional[str]:
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode):
        return f"{path} is not a FIFO"
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & WRITABLE_BY_OTHERS:
        return f"{path} is not this user's alone (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _open_fifo(path: Path, flags: int, shown: Path) -> tuple[Optional[int], Optional[str]]:
    """``path`` opened (never through a link) and checked: (descriptor, None) or (None, why not, naming ``shown``)."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        path = shown
        return None, (f"the batch script has no requeue helper ({path} is missing: a job queued by an older "
                      "mnist-hpc, or a batch script of your own)")
    except OSError as exc:
        path = shown
        if exc.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            return None, f"the batch script's requeue helper is not running (nothing reads {path})"
        return None, f"cannot use the batch script's requeue helper at {path} ({exc.strerror})"
    problem = _fifo_problem(fd, shown)
    if problem is not None:
        os.close(fd)
        return None, f"refused the batch script's requeue helper: {problem}"
    return fd, None


def ask_batch_script(folder: str, job_id: str, wait_s: float = ANSWER_WAIT_S, shown_folder: Optional[str] = None) -> Optional[str]:
    """Ask the batch script's helper to requeue Slurm job ``job_id``: None once Slurm took the requeue, else why not.

    ``folder``: the job's submitit folder (in a job, the one :mod:`.guard` pinned: the FIFOs are
    opened in the very folder it checked); ``shown_folder``: its name for messages. Slurm ends
    this attempt (and the helper with it) once it takes the requeue; the answer may never come
    then, and this process is ended meanwhile. Never blocks longer than ``wait_s``: the FIFOs are
    opened non-blocking and the answer awaited with ``select``.
    """
    base, shown = fifo_base(folder, job_id), fifo_base(shown_folder or folder, job_id)
    # The answer's reader first: the helper's open for writing then finds it and does not block.
    answer_fd, why = _open_fifo(Path(f"{base}{ANSWER_SUFFIX}"), os.O_RDONLY, Path(f"{shown}{ANSWER_SUFFIX}"))
    if answer_fd is None:
        return why
    try:
        ask_fd, why = _open_fifo(Path(f"{base}{ASK_SUFFIX}"), os.O_WRONLY, Path(f"{shown}{ASK_SUFFIX}"))
        if ask_fd is None:
            return why
        try:
            os.write(ask_fd, f"{REQUEST}\n".encode())
        finally:
            os.close(ask_fd)
        received = b""
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            ready = select.select([answer_fd], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                return f"the batch script's requeue helper did not answer within {wait_s:.0f} s"
            chunk = os.read(answer_fd, 4096)
            if not chunk:
                break
            received += chunk
    finally:
        os.close(answer_fd)
    code, _, said = received.decode(errors="replace").strip().partition(" ")
    if code == "0":
        return None
    said = " ".join(said.split())
    return (f"the batch script asked Slurm, which refused: {said}" if said
            else f"the batch script's scontrol requeue exited with {code or 'no status'}")
