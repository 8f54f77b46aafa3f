"""No one else's code in your job: the files a job unpickles are private, and checked before use.

A sweep's submitit folder (``<sweep>/.submitit``) holds what its jobs run: the launch pickle
(:class:`~mnist_hpc.contract.tasks.LaunchContext`), each job's pickle, the submission scripts.
Unpickling runs code, so whoever can write one of them, or a folder it lies in, can make the job
run their code as its owner; in a group-writable project directory (``2775``, umask 002) that is
anyone in the group. This module owns the rule on both sides:

* Login node: :func:`private_folder` creates the submitit folder 0700 (or takes group and other
  write off an existing one of the user's), and inside :func:`private_submission` everything is
  created 0600/0700 whatever the umask (submitit's pickles, scripts and job folders, the launch
  pickle), while the jobs still run with the user's own umask (their run directories stay
  shared as before).
* Compute node: a job's command is ``<python> -u -c <JOB_COMMAND> -u -m submitit.core._submit
  <folder>`` (:func:`guarded_python`; no module from the working directory is imported).
  :func:`main` checks the job's pickle with :func:`open_private`, then hands over to submitit's
  own entry point; a refusal is one line in the job's stderr and exit status 1 (the job ends
  FAILED), with nothing unpickled. The launch pickle (``LaunchContext.load``) and
  :class:`~mnist_hpc.contract.entry.JobEntry` go through the same :func:`open_private`.

What :func:`open_private` refuses: a file, or a folder on its way down from the *anchor*, that
is not owned by the job's user, that its group or others may write (the group bits of the mode
also bound any ACL entry), that is a symbolic link, or that is not what it should be (a regular
file, a folder). The anchor is the fixed part of the submitit folder (``<sweep>/.submitit``):
everything from it down is created by the launcher for the job alone. Folders above it are not
checked, because they are group-writable by design (the sweep directory, the project space),
and what a group member can do there -- move the folder away and put one of their own in its
place -- yields a folder that is not the user's, which the walk refuses. The walk holds each
folder open and goes down by ``openat`` without following links; the launch pickle is read from
the very descriptor that was checked.

Only the standard library at module level: a job imports this before anything else (no
TensorFlow, nothing slow).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pickle
import pwd
import shlex
import stat
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

# The module submitit's executors run on the node (they append ``-u -m`` it and the folder).
SUBMIT_MODULE = "submitit.core._submit"
# What the job's Python runs instead (``-c``), before the arguments submitit appends. Not ``-m``:
# ``python -m`` and ``-c`` put the working directory first on sys.path, and a job works where it
# was submitted from, often the group-writable project directory, where anyone in the group
# could put a ``mnist_hpc``, ``submitit`` or ``numpy`` of their own. It is taken off the path
# before anything is imported (the -P flag does that from Python 3.11 on only). An empty element
# of PYTHONPATH (``export PYTHONPATH=$PYTHONPATH:/lib`` when it was unset) puts the same directory
# there again, spelled out: it is taken off too, unless PYTHONPATH names it (in any spelling:
# ``$PWD/``, ``parent/./dir``). Jobs are queued with empty elements dropped (:func:`job_python_environ`),
# and a Slurm batch script drops any a setup line adds back (:data:`PYTHON_PATH_SETUP`).
JOB_COMMAND = (
    'import os, sys; here = os.getcwd(); named = {os.path.normpath(os.path.join(here, e)) '
    'for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e}; '
    "sys.path[:] = [p for p in sys.path if p and (p != here or p in named)]; "
    "from mnist_hpc.contract.guard import main; main()"
)
# Mode bits that let someone other than the owner write.
WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
# How long a job waits for its pickle to appear: submitit's own wait (an array's pickles are
# moved into its folder only after sbatch has returned, and a task may start before).
PICKLE_WAIT_S = 60
# The line a job prints for an error it knows (as mnist_hpc.compute.failures.exit_on does).
ERROR_PREFIX = "mnist-hpc: error:"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO put in a pickle's place opens at once (and is then refused) instead of blocking.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafeJobFile(RuntimeError):
    """A file a job would run or unpickle, or a folder holding it, may have been written by someone else."""


# --- the check ----------------------------------------------------------------------------------


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _problem(st: os.stat_result, path: Path, directory: bool, check_mode: bool = True) -> Optional[str]:
    """Why ``path`` (its ``fstat``) may not be used, with the fix; None when it is the user's alone."""
    if directory and not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder; submit the job again"
    if not directory and not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file; someone replaced it: submit the job again"
    me = os.geteuid()
    if st.st_uid != me:
        return (
            f"{path} belongs to {_user(st.st_uid)}, not to {_user(me)} who runs this job: someone else made or "
            "replaced it, and what it holds would run as you. Do not use it: submit the job again "
            "(into a new hydra.sweep.dir if this folder is not yours)"
        )
    mode = stat.S_IMODE(st.st_mode)
    if not check_mode or not mode & WRITABLE_BY_OTHERS:
        return None
    who = " and ".join(
        name for bit, name in ((stat.S_IWGRP, f"its group {_group(st.st_gid)}"), (stat.S_IWOTH, "all users")) if mode & bit
    )
    if directory:
        return (
            f"{path} is writable by {who} (mode {mode:04o}): they could replace what this job runs. Make it "
            f"yours alone (`chmod go-w {shlex.quote(str(path))}`) and submit the job again"
        )
    return (
        f"{path} is writable by {who} (mode {mode:04o}): someone may have changed it, and it would run as you. "
        "Submit the job again (the launcher writes job files 0600)"
    )


def _open_checked(name: str, dir_fd: Optional[int], shown: Path, directory: bool, check_mode: bool = True) -> int:
    """Open ``name`` (in ``dir_fd``) without following a link, and check what was opened."""
    try:
        fd = os.open(name, _DIR_FLAGS if directory else _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            raise UnsafeJobFile(f"{shown} is not a folder; submit the job again") from None
        raise UnsafeJobFile(
            f"{shown} is a symbolic link (to {target}): a job's files are never links, someone replaced it. "
            "Do not use it: submit the job again"
        ) from None
    return _checked(fd, shown, directory, check_mode)


def _checked(fd: int, shown: Path, directory: bool, check_mode: bool = True) -> int:
    """``fd`` if what it holds passes :func:`_problem`; else it is closed and :class:`UnsafeJobFile` raised."""
    try:
        problem = _problem(os.fstat(fd), shown, directory, check_mode)
        if problem is not None:
            raise UnsafeJobFile(problem)
    except BaseException:
        os.close(fd)
        raise
    return fd


# A folder :func:`main` checked and holds open, named through its descriptor: what submitit then
# opens below it is in that very folder, whatever has been renamed above it since.
PINNED_PREFIX = "/proc/self/fd/"
# The job's submitit folder as the launcher named it, for messages (SUBMITIT_FOLDER is the pinned name).
JOB_FOLDER_ENV = "MNIST_HPC_SUBMITIT_FOLDER"


# Pinned descriptors -> the anchor's own name, for messages.
_PINNED_NAMES: dict[int, Path] = {}


def _pinned(anchor: Path) -> Optional[int]:
    text = str(anchor)
    number = text[len(PINNED_PREFIX):]
    return int(number) if text.startswith(PINNED_PREFIX) and number.isascii() and number.isdigit() else None


def _open_anchor(anchor: Path) -> int:
    """A checked descriptor of ``anchor``: opened by name, or a copy of the one :func:`main` pinned."""
    number = _pinned(anchor)
    if number is not None:
        return _checked(os.dup(number), _PINNED_NAMES.get(number, anchor), directory=True)
    return _open_checked(str(anchor), None, anchor, directory=True)


def named_paths(env: Any) -> Any:
    """submitit's paths of the job ``env`` (a JobEnvironment) under the folder's name as the launcher
    gave it, for what people read (job.json's log paths), not the descriptor :func:`pin_folder` made."""
    from submitit.core.utils import JobPaths

    folder = os.environ.get(JOB_FOLDER_ENV) or os.environ["SUBMITIT_FOLDER"]
    return JobPaths(folder, job_id=env.job_id, task_id=env.global_rank)


def pin_folder(folder: str) -> str:
    """``folder`` (a submitit folder, maybe with ``%j``) named through a descriptor of its checked anchor.

    The anchor (``<sweep>/.submitit``) lies in a folder others of the group may write: one of them
    could rename it away and put their own in its place between a check by name and submitit's own
    open by name. Through ``/proc/self/fd/N`` every later open goes into the folder that was checked.

    Raises:
        UnsafeJobFile: the anchor is not the user's alone, or is a link.
    """
    from submitit.core import utils

    anchor = Path(utils.JobPaths.get_first_id_independent_folder(folder))
    fd = _open_checked(str(anchor), None, anchor, directory=True)  # held open for the job's life
    _PINNED_NAMES[fd] = anchor
    rest = os.path.relpath(folder, anchor)
    return PINNED_PREFIX + str(fd) + ("" if rest == "." else "/" + rest)


def open_private(path: Path, anchor: Path) -> int:
    """A read-only descriptor of ``path``, opened from ``anchor`` down, each step checked first.

    Args:
        path: a file at or below ``anchor``.
        anchor: the folder the check starts at (the fixed part of the submitit folder); see the
            module's docstring for why the folders above it are not checked.

    Raises:
        UnsafeJobFile: ``anchor``, a folder between it and ``path``, or ``path`` is not owned by
            this process's user, is writable by group or others, is a symbolic link, or is not a
            folder (a regular file for ``path``). The message names it and the fix.
        FileNotFoundError: ``path`` or a folder on its way is absent.
    """
    path, anchor = Path(path), Path(anchor)
    parts = path.relative_to(anchor).parts
    assert parts, f"{path} is the anchor itself, not a file below it"
    fd = _open_anchor(anchor)
    number = _pinned(anchor)
    shown = _PINNED_NAMES.get(number, anchor) if number is not None else anchor
    try:
        where = shown
        for name in parts[:-1]:
            where = where / name
            below = _open_checked(name, fd, where, directory=True)
            os.close(fd)
            fd = below
        return _open_checked(parts[-1], fd, shown.joinpath(*parts), directory=False)
    finally:
        os.close(fd)


def check_private(path: Path, anchor: Path) -> None:
    """:func:`open_private` without keeping the descriptor."""
    os.close(open_private(path, anchor))


def load_private(path: Path, anchor: Path) -> Any:
    """Unpickle ``path`` from the descriptor :func:`open_private` checked (raises as it does)."""
    with os.fdopen(open_private(path, anchor), "rb") as fh:
        return pickle.load(fh)


# --- the login node: creating them private --------------------------------------------------------


def guarded_python(python: str) -> str:
    """The command submitit's executors are given as ``python``: they append ``-u -m
    submitit.core._submit <folder>``, which :func:`main` runs after its check."""
    return f"{python} -u -c {shlex.quote(JOB_COMMAND)}"


@contextlib.contextmanager
def private_umask() -> Iterator[int]:
    """Inside, files are created 0600 and folders 0700, whatever the umask was (yields that umask)."""
    mask = os.umask(0o077)
    try:
        yield mask
    finally:
        os.umask(mask)


@contextlib.contextmanager
def private_submission() -> Iterator[None]:
    """Queue jobs inside: what submitit writes is private, the jobs keep the user's umask.

    submitit creates its pickles, scripts and job folders with plain ``open``/``mkdir``, so the
    umask is the one way to make them private. A job queued meanwhile would inherit umask 077
    and make its run directory private too; ``SLURM_UMASK`` carries the user's own umask to it
    instead (sbatch uses a preset value as the job's umask; :func:`main` applies it to local jobs).
    Variables the launcher set for Hydra's sake (``HYDRA_FULL_ERROR``, see
    :func:`mnist_hpc.hydra_adapter.run_app`) have the user's own values meanwhile. Not to be entered inside
    :func:`private_umask`.
    """
    from mnist_hpc.hydra_adapter import set_for_hydra

    with private_umask() as mask:
        users = set_for_hydra()  # the launcher's own values, not the user's: jobs get the user's back
        saved = {key: os.environ.get(key) for key in ("SLURM_UMASK", *PYTHON_PATH_VARIABLES, *users)}
        changes = {**job_python_environ(os.environ), **users}
        if saved["SLURM_UMASK"] is None:
            changes["SLURM_UMASK"] = f"{mask:04o}"
        _set_environ(changes)
        try:
            yield
        finally:
            _set_environ(saved)


# What decides which folders a job's Python imports from before the guard runs.
PYTHON_PATH_VARIABLES = ("PYTHONPATH", "PYTHONSAFEPATH")


def job_python_environ(environ: Mapping[str, str]) -> dict[str, Optional[str]]:
    """The ``PYTHONPATH`` and ``PYTHONSAFEPATH`` jobs are queued with (None: unset).

    Jobs inherit the submitter's environment (sbatch's default ``--export=ALL``; submitit's local
    controller copies it). An empty element of ``PYTHONPATH`` puts the working directory -- often
    the group-writable project directory -- on ``sys.path`` while Python starts, before any check:
    a group member's ``sitecustomize.py`` there would run as the job's user. Empty elements are
    dropped (an empty ``PYTHONPATH`` is unset). ``PYTHONSAFEPATH`` keeps ``python -m`` (submitit's
    local controller) from putting the working directory first as well.
    """
    value = environ.get("PYTHONPATH")
    kept = None if value is None else os.pathsep.join(p for p in value.split(os.pathsep) if p) or None
    return {"PYTHONPATH": kept, "PYTHONSAFEPATH": "1"}


# The same, as the last of a Slurm batch script's setup lines (after the user's, which may add an
# empty element back: ``export PYTHONPATH=$PYTHONPATH:/lib`` while it is unset), so that the
# job's Python starts without the working directory on its path (mnist_hpc.login.launcher.options).
PYTHON_PATH_SETUP = (
    "# mnist-hpc: no empty PYTHONPATH element: it would put this directory on the job's path before its guard runs",
    'if [ -n "${PYTHONPATH+x}" ]; then mnist_hpc_pythonpath=$(printf %s "$PYTHONPATH" | tr -s : | sed "s/^://; s/:$//"); '
    'if [ -n "$mnist_hpc_pythonpath" ]; then export PYTHONPATH="$mnist_hpc_pythonpath"; else unset PYTHONPATH; fi; fi',
    "export PYTHONSAFEPATH=1",
)


def _set_environ(values: Mapping[str, Optional[str]]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def private_folder(root: Path) -> Optional[str]:
    """Make ``root`` (the fixed part of a submitit folder) the user's alone before jobs are queued into it.

    Creates it 0700 (its parents as usual), or takes group and other write off an existing
    folder of the user's (``chmod go-w``: its jobs would refuse it). Returns a notice for the
    user when it changed an existing folder.

    Raises:
        UnsafeJobFile: it is a symbolic link, not a folder, or another user's (nothing changed).
        OSError: it cannot be created.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    fd = _open_checked(str(root), None, root, directory=True, check_mode=False)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & WRITABLE_BY_OTHERS:
            os.fchmod(fd, mode & ~WRITABLE_BY_OTHERS)
            return f"made {root} writable by you alone (was {mode:04o}): jobs refuse job files that others could write"
        return None
    finally:
        os.close(fd)


# --- the compute node: the job's command ---------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> None:
    """``python -u -c JOB_COMMAND -u -m submitit.core._submit <folder>``: check, then hand over to submitit.

    The job's submission script (when it is on disk) and its pickle are checked with
    :func:`open_private`; only then does submitit's own entry point (``submitit_main``, what
    ``python -m submitit.core._submit`` runs) load and run the job. A refusal is one line and exit
    status 1, with nothing unpickled. submitit opens the pickle again by its path, given through
    the descriptor of the checked folder (:func:`pin_folder`): a group member who renames the
    submitit folder away and puts their own in its place, at any instant, changes nothing the job
    opens.

    The process keeps umask 077 while submitit sets the job up; :class:`JobEntry` gives the job the
    user's own umask (:func:`apply_user_umask`) for its run directories.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 4 or args[:3] != ["-u", "-m", SUBMIT_MODULE]:
        print(f"usage: python -u -c {shlex.quote(JOB_COMMAND)} -u -m {SUBMIT_MODULE} <submitit folder>", file=sys.stderr)
        raise SystemExit(2)
    folder = args[3]
    os.umask(0o077)
    try:
        os.environ[JOB_FOLDER_ENV] = folder
        folder = pin_folder(folder)
        check_job_files(folder)
    except UnsafeJobFile as exc:
        print(f"{ERROR_PREFIX} {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    from submitit.core.submission import submitit_main

    sys.argv = [SUBMIT_MODULE, folder]
    submitit_main()


def apply_user_umask() -> None:
    """The submitter's umask for what the job writes from now on (its run directories).

    ``SLURM_UMASK`` carries it (:func:`private_submission` sets it when the user has not): Slurm
    applied it when the job started, and :func:`main` replaced it by 077 while submitit set up.
    """
    try:
        os.umask(int(os.environ.get("SLURM_UMASK", ""), 8) & 0o777)
    except ValueError:
        pass  # not set: keep the umask the job was started with


def check_job_files(folder: str) -> None:
    """This job's submission script (if on disk) and pickle pass :func:`open_private`.

    Waits for the pickle as submitit does (an array's pickles are moved into its folder after
    sbatch returns, and a task may start before).

    Raises:
        UnsafeJobFile: as :func:`open_private` says.
    """
    from submitit.core import utils
    from submitit.core.job_environment import JobEnvironment

    os.environ["SUBMITIT_FOLDER"] = folder
    paths = JobEnvironment().paths
    anchor = utils.JobPaths.get_first_id_independent_folder(folder)
    # Slurm runs its own copy of the script; the one on disk is what a user would run again by
    # hand, so it is held to the same rule (when it is there: local jobs have none).
    with contextlib.suppress(FileNotFoundError):
        check_private(paths.submission_file, anchor)
    deadline = time.monotonic() + PICKLE_WAIT_S
    while True:
        try:
            check_private(paths.submitted_pickle, anchor)
            return
        except FileNotFoundError:
            if time.monotonic() > deadline:
                return  # submitit says it cannot find the pickle, in its own words
            time.sleep(1)


def check_started_job() -> None:
    """In a job run by submitit: its pickle passes :func:`open_private` (no-op outside submitit).

    Under :func:`main` this was checked before the pickle was read; a job started another way (a
    submission script of an older version run by hand) is refused here before its payload is.
    """
    folder = os.environ.get("SUBMITIT_FOLDER")
    if not folder:
        return
    from submitit.core import job_environment, utils

    try:
        env = job_environment.JobEnvironment()
    except RuntimeError:
        return  # not inside a submitit job
    with contextlib.suppress(FileNotFoundError):  # deleted since it was read: nothing left to judge
        check_private(env.paths.submitted_pickle, utils.JobPaths.get_first_id_independent_folder(folder))

