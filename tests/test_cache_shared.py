"""A cache shared by a group, used in turns by two real Unix users, one of them killed mid-prefetch.

The test creates the users and their group itself (root, as in CI) and a Python environment
they can run: /root is private, so /root/.pyenv's interpreter is out of their reach. It builds
a venv from the system Python in /var/tmp (kept between runs, rebuilt when the pinned versions
change) and copies the package to a world-readable directory. The shared directory is set up
as on a cluster: owned by the group, setgid; users run with umask 002 unless a test gives one
(077, 027 and 022 must leave the cache as usable by the group as 002 does).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mnist_hpc.cache import manifest_path, object_path
from mnist_hpc.login.prefetch import store
from tests.helpers import (
    GROUP,
    REPO,
    SYSTEM_PYTHON,
    USERS,
    ensure_users,
    need,
    npz_bytes,
    sha,
    pinned_venv,
    synthetic_mnist,
    write_npz,
)
from tests.http_fixture import LoopbackServer, Route

VENV = Path("/var/tmp/mnist-hpc-test-users-venv")
PACKAGES = ("numpy", "hydra-core", "omegaconf", "pooch", "requests", "tqdm")


def ensure_venv() -> Path:
    """A venv any user can run, with the versions this environment has of what prefetch imports."""
    return pinned_venv(VENV, PACKAGES)


class Users:
    """Runs commands as the test users, from a readable copy of this checkout."""

    def __init__(self, base: Path, python: Path) -> None:
        self.base, self.python = base, python
        self.src = base / "src"
        for part in ("mnist_hpc", "conf"):
            shutil.copytree(REPO / part, self.src / part, ignore=shutil.ignore_patterns("__pycache__"))
        for user in USERS:
            home = base / f"home-{user}"
            home.mkdir()
            os.chown(home, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)

    def popen(self, user: str, *args: str, umask: int = 0o002) -> subprocess.Popen:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.base / f"home-{user}"), "PYTHONPATH": str(self.src),
               "PYTHONDONTWRITEBYTECODE": "1", "NO_PROXY": "127.0.0.1,localhost", "LANG": "C.UTF-8"}
        return subprocess.Popen([str(self.python), *args], user=user, group=user, extra_groups=[GROUP],
                                umask=umask, env=env, cwd=self.base, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(self, user: str, *args: str, umask: int = 0o002) -> subprocess.CompletedProcess:
        proc = self.popen(user, *args, umask=umask)
        out, err = proc.communicate(timeout=180)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def prefetch(self, user: str, *args: str, umask: int = 0o002) -> subprocess.CompletedProcess:
        return self.run(user, "-m", "mnist_hpc.login.prefetch", *args, umask=umask)

    def job_read(self, user: str, cache_dir: Path) -> subprocess.CompletedProcess:
        """What a training job does first: ``read_verified``; prints the sha256 it verified."""
        return self.run(user, "-c", "import sys; from mnist_hpc.cache import read_verified; "
                        "from mnist_hpc.config import DataConfig; "
                        "print(read_verified(DataConfig(cache_dir=sys.argv[1]))[1]['sha256'])", str(cache_dir))


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    need(os.geteuid() == 0, "creating users needs root")
    need(SYSTEM_PYTHON.exists() and shutil.which("useradd") is not None, "needs /usr/bin/python3 and useradd")
    ensure_users()
    python = ensure_venv()
    base = Path(tempfile.mkdtemp(prefix="mnist-hpc-users-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    try:
        yield Users(base, python)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def group_dir(parent: Path, name: str) -> Path:
    """A directory as a cluster's group space is set up: group-owned, setgid, group-writable."""
    path = parent / name
    path.mkdir()
    os.chown(path, 0, grp.getgrnam(GROUP).gr_gid)
    os.chmod(path, 0o2775)
    return path


def readable_npz(users: Users, name: str, seed: int) -> tuple[Path, str]:
    path = users.base / name
    write_npz(path, synthetic_mnist(n_train=60, n_test=20, seed=seed))
    os.chmod(path, 0o644)
    return path, sha(path.read_bytes())


def test_group_cache_survives_a_killed_prefetch_and_users_taking_turns(users: Users) -> None:
    cache_dir = group_dir(users.base, "project") / "mnist"
    a_source, a_sha = readable_npz(users, "a.npz", seed=1)
    b_source, b_sha = readable_npz(users, "b.npz", seed=2)
    server = LoopbackServer().start()
    gate = threading.Event()
    body = npz_bytes(synthetic_mnist(n_train=30, n_test=10))
    url = server.add("/mnist.npz", Route(body=body, gate=gate, gate_timeout_s=120))
    try:
        # User A starts a download and is killed while it holds the lock.
        killed = users.popen(USERS[0], "-m", "mnist_hpc.login.prefetch", "--url", url, "--sha256", sha(body),
                             f"data.cache_dir={cache_dir}")
        deadline = time.monotonic() + 120
        while not (server.count("/mnist.npz") and list(cache_dir.glob(store.STAGING_PREFIX + "*"))):
            assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()
            time.sleep(0.05)
        killed.kill()
        killed.communicate(timeout=60)
    finally:
        gate.set()
        server.stop()
    lock = cache_dir / store.LOCK_NAME
    left = os.stat(lock)
    assert pwd.getpwuid(left.st_uid).pw_name == USERS[0] and grp.getgrgid(left.st_gid).gr_name == GROUP
    assert stat.S_IMODE(left.st_mode) == 0o664
    assert list(cache_dir.glob(store.STAGING_PREFIX + "*"))  # SIGKILL leaves the staging directory

    # User B takes over: the leftover lock blocks nothing, the staging directory is swept.
    b = users.prefetch(USERS[1], "--from", str(b_source), f"data.cache_dir={cache_dir}")
    assert b.returncode == 0, b.stderr
    assert b.stdout.strip() == str(cache_dir / "mnist.npz")
    assert not list(cache_dir.glob(store.STAGING_PREFIX + "*"))
    assert (os.stat(lock).st_ino, stat.S_IMODE(os.stat(lock).st_mode)) == (left.st_ino, 0o664)

    # User A replaces B's dataset, then B's jobs read A's dataset, and B's plain prefetch keeps it.
    a = users.prefetch(USERS[0], "--force", "--from", str(a_source), f"data.cache_dir={cache_dir}")
    assert a.returncode == 0, a.stderr
    read = users.run(USERS[1], "-c", "import sys; from mnist_hpc.cache import read_verified; "
                     "from mnist_hpc.config import DataConfig; "
                     "print(read_verified(DataConfig(cache_dir=sys.argv[1]))[1]['sha256'])", str(cache_dir))
    assert read.returncode == 0 and read.stdout.strip() == a_sha, read.stderr
    again = users.prefetch(USERS[1], f"data.cache_dir={cache_dir}")
    assert again.returncode == 0 and "already cached and verified" in again.stderr, again.stderr
    manifest = json.loads(manifest_path(cache_dir / "mnist.npz").read_text())
    assert manifest["sha256"] == a_sha
    for obj in (object_path(cache_dir / "mnist.npz", a_sha), object_path(cache_dir / "mnist.npz", b_sha)):
        assert grp.getgrgid(os.stat(obj).st_gid).gr_name == GROUP and os.stat(obj).st_mode & stat.S_IRGRP
    assert os.stat(lock).st_ino == left.st_ino  # never removed


def test_another_users_private_lock_is_named_in_the_error(users: Users) -> None:
    """A lock left by an older version (0644) still works; an unreadable one is named, with the fix."""
    cache_dir = group_dir(users.base, "legacy")
    source, _ = readable_npz(users, "legacy.npz", seed=3)
    lock = cache_dir / store.LOCK_NAME
    lock.touch()
    os.chown(lock, pwd.getpwnam(USERS[0]).pw_uid, pwd.getpwnam(USERS[0]).pw_gid)
    os.chmod(lock, 0o644)
    ok = users.prefetch(USERS[1], "--from", str(source), f"data.cache_dir={cache_dir}")
    assert ok.returncode == 0, ok.stderr

    os.chmod(lock, 0o600)
    refused = users.prefetch(USERS[1], "--force", "--from", str(source), f"data.cache_dir={cache_dir}")
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert f"cannot open the lock file {lock}" in refused.stderr
    assert f"owner {USERS[0]}" in refused.stderr and f"chmod g+rw {lock}" in refused.stderr


# ---------------------------------------------------------------------------- umasks (I10)

UMASKS = (0o077, 0o027, 0o022)
# Modes as prefetch asks for them: a umask keeps its say over the owner's and others' bits, while
# the group gets the bits of the base mode, so that another member can read, replace or lock.
BASE_MODES = {"lock": 0o666, "manifest": 0o666, "object": 0o444, "directory": 0o777, "staging": 0o770,
              "staged": 0o666}


def expected_mode(kind: str, umask: int) -> int:
    base = BASE_MODES[kind]
    return (base & ~umask) | (base & 0o070) | (stat.S_ISGID if kind in ("directory", "staging") else 0)


def kind_of(cache_dir: Path, path: Path) -> str:
    if path.name == store.LOCK_NAME:
        return "lock"
    if path.name.endswith(".manifest.json"):
        return "manifest"
    if path.parent.name.startswith(store.STAGING_PREFIX):
        return "staged"
    if path.name.startswith(store.STAGING_PREFIX):
        return "staging"
    if path.is_dir():
        return "directory"
    return "object"


def assert_shared(cache_dir: Path, umasks: dict[str, int]) -> list[str]:
    """Every entry under ``cache_dir`` (and itself) belongs to the group, with the mode its writer's
    umask and the group's needs give; symbolic links (whose mode means nothing) only to the group.
    ``umasks``: each writer's umask. Returns what was checked, for the test to assert on."""
    checked = []
    for path in [cache_dir, *sorted(cache_dir.rglob("*"))]:
        st = os.lstat(path)
        owner = pwd.getpwuid(st.st_uid).pw_name
        assert grp.getgrgid(st.st_gid).gr_name == GROUP, path
        if stat.S_ISLNK(st.st_mode):
            checked.append(f"link {path.name}")
            continue
        kind = kind_of(cache_dir, path)
        assert f"{stat.S_IMODE(st.st_mode):04o}" == f"{expected_mode(kind, umasks[owner]):04o}", (path, owner)
        checked.append(f"{kind} {path.name}")
    return checked


@pytest.mark.parametrize("umask", UMASKS, ids=lambda umask: f"umask{umask:03o}")
def test_a_private_umask_leaves_a_group_cache_usable_by_the_group(users: Users, umask: int) -> None:
    """The issue's scenario: a root:group 2775 cache; B imports with umask 022, then A runs
    `--from other.npz --force` with ``umask``. B can still read everything: no download, no error."""
    a, b = USERS
    cache_dir = group_dir(users.base, f"issue-{umask:03o}")
    b_source, b_sha = readable_npz(users, f"b-{umask:03o}.npz", seed=4)
    other, other_sha = readable_npz(users, f"other-{umask:03o}.npz", seed=5)
    target = cache_dir / "mnist.npz"
    server = LoopbackServer().start()  # counts requests: B's plain prefetch must send none
    url = server.add("/mnist.npz", Route(body=b"not MNIST", status=500))
    try:
        imported = users.prefetch(b, "--from", str(b_source), f"data.cache_dir={cache_dir}", umask=0o022)
        assert imported.returncode == 0, imported.stderr
        forced = users.prefetch(a, "--from", str(other), "--force", f"data.cache_dir={cache_dir}", umask=umask)
        assert forced.returncode == 0, forced.stderr

        manifest, obj = manifest_path(target), object_path(target, other_sha)
        read = users.run(b, "-c", "import sys; print(*(len(open(p, 'rb').read()) for p in sys.argv[1:]))",
                         str(manifest), str(obj))
        assert read.returncode == 0, read.stderr
        assert read.stdout.split() == [str(manifest.stat().st_size), str(obj.stat().st_size)]
        again = users.prefetch(b, "--url", url, f"data.cache_dir={cache_dir}", umask=0o022)
        assert again.returncode == 0, again.stderr
        assert f"already cached and verified: {target}" in again.stderr
        assert server.count("/mnist.npz") == 0
        job = users.job_read(b, cache_dir)
        assert job.returncode == 0 and job.stdout.strip() == other_sha, job.stderr
    finally:
        server.stop()
    checked = assert_shared(cache_dir, {"root": 0o002, a: umask, b: 0o022})
    assert sorted(checked) == sorted([
        "directory issue-%03o" % umask, "lock " + store.LOCK_NAME, "manifest mnist.npz.manifest.json",
        "link mnist.npz", "directory .mnist.npz.objects", f"object {other_sha}.npz", f"object {b_sha}.npz",
    ])
    assert pwd.getpwuid(os.stat(manifest).st_uid).pw_name == a  # A's umask was the one tested


@pytest.mark.parametrize("umask", UMASKS, ids=lambda umask: f"umask{umask:03o}")
def test_all_a_private_umask_creates_in_a_group_directory_is_shared(users: Users, umask: int) -> None:
    """A, with ``umask``, creates everything: the cache directory inside the group's, the lock, a
    staging directory and its temporary file (left by a killed download), then the object store,
    the object, the manifest and the link. B then uses the cache, and replaces it."""
    a, b = USERS
    cache_dir = group_dir(users.base, f"fresh-{umask:03o}") / "mnist"
    a_source, a_sha = readable_npz(users, f"fresh-a-{umask:03o}.npz", seed=6)
    b_source, b_sha = readable_npz(users, f"fresh-b-{umask:03o}.npz", seed=7)
    server = LoopbackServer().start()
    gate = threading.Event()
    body = npz_bytes(synthetic_mnist(n_train=30, n_test=10))
    url = server.add("/mnist.npz", Route(body=body, gate=gate, gate_timeout_s=120))
    try:
        killed = users.popen(a, "-m", "mnist_hpc.login.prefetch", "--url", url, "--sha256", sha(body),
                             f"data.cache_dir={cache_dir}", umask=umask)
        deadline = time.monotonic() + 120
        while not (server.count("/mnist.npz") and list(cache_dir.glob(store.STAGING_PREFIX + "*/*"))):
            assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()
            time.sleep(0.05)
        killed.kill()
        killed.communicate(timeout=60)
        left = assert_shared(cache_dir, {a: umask})
        assert sorted(kind.split()[0] for kind in left) == ["directory", "lock", "staged", "staging"]

        imported = users.prefetch(a, "--from", str(a_source), f"data.cache_dir={cache_dir}", umask=umask)
        assert imported.returncode == 0, imported.stderr
        checked = assert_shared(cache_dir, {a: umask})
        assert sorted(kind.split()[0] for kind in checked) == [
            "directory", "directory", "link", "lock", "manifest", "object"]

        again = users.prefetch(b, "--url", url, f"data.cache_dir={cache_dir}")
        assert again.returncode == 0 and "already cached and verified" in again.stderr, again.stderr
        assert server.count("/mnist.npz") == 1  # only the killed download's request
        job = users.job_read(b, cache_dir)
        assert job.returncode == 0 and job.stdout.strip() == a_sha, job.stderr
        replaced = users.prefetch(b, "--force", "--from", str(b_source), f"data.cache_dir={cache_dir}")
        assert replaced.returncode == 0, replaced.stderr
    finally:
        gate.set()
        server.stop()
    job = users.job_read(a, cache_dir)
    assert job.returncode == 0 and job.stdout.strip() == b_sha, job.stderr
    assert_shared(cache_dir, {a: umask, b: 0o002})


def test_a_manifest_left_private_is_named_not_taken_for_missing(users: Users) -> None:
    """A cache an older version left with a private manifest: B's plain prefetch does not download
    over it, and B's job says which file and what its owner can run."""
    a, b = USERS
    cache_dir = group_dir(users.base, "legacy-private")
    source, digest = readable_npz(users, "legacy-private.npz", seed=8)
    assert users.prefetch(a, "--from", str(source), f"data.cache_dir={cache_dir}").returncode == 0
    manifest = manifest_path(cache_dir / "mnist.npz")
    os.chmod(manifest, 0o600)
    server = LoopbackServer().start()
    url = server.add("/mnist.npz", Route(body=b"not MNIST", status=500))
    try:
        refused = users.prefetch(b, "--url", url, f"data.cache_dir={cache_dir}")
    finally:
        server.stop()
    assert refused.returncode == 1 and server.count("/mnist.npz") == 0
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"cannot read {manifest}: Permission denied (its owner can run `chmod g+r {manifest}`)" in errors[0]
    assert "--force replaces it" in errors[0]
    job = users.job_read(b, cache_dir)
    assert job.returncode == 1 and f"its owner can run `chmod g+r {manifest}`" in job.stderr
    assert json.loads(manifest.read_text())["sha256"] == digest  # untouched
