"""Hostile tester's reproduction (issue 21, I12) with two real users: a search worker runs what search.json names.

User A submits an asynchronous search from a group project directory (root:group 2775, umask 002);
the worker is held at its start (the gate of tests/test_job_guard.py). User B, in the same group,
replaces ``search.json`` (B may rename a file over A's in a group-writable directory) with a sampler
whose ``_target_`` is ``shutil.copyfile``, which Hydra's target policy lets through. A's worker
builds its sampler from that file before each trial (``SearchWorker._sampler``): it copies B's file
over a file of A's (here A's ``~/.bashrc``, which A's next shell runs), as A.

It failed before its fix; a failure to set the case up is a real error.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import (
    GATED_PYTHON,
    GROUP,
    JOB_VENV,
    REPO,
    SYSTEM_PYTHON,
    USERS,
    ensure_job_venv,
    ensure_users,
    fill_cache,
    need,
    tiny_overrides,
)

A, B = USERS
# A's job venv and Optuna: the guard test's venv (TensorFlow and the rest), read through a .pth file.
SEARCH_VENV = Path("/var/tmp/mnist-hpc-test-hostile-search-venv")

ATTACK = r'''
import json, os, sys
spec_path, payload, target = sys.argv[1:4]
spec = json.load(open(spec_path))
spec["sampler"] = {"_target_": "shutil.copyfile", "src": payload, "dst": target}
with open(spec_path + ".b", "w") as fh:
    json.dump(spec, fh)
os.replace(spec_path + ".b", spec_path)
'''


def ensure_search_venv() -> Path:
    ensure_job_venv()
    version = importlib.metadata.version("optuna")
    python, marker = SEARCH_VENV / "bin" / "python3", SEARCH_VENV / "optuna-version.txt"
    if not (python.exists() and marker.exists() and marker.read_text() == version):
        shutil.rmtree(SEARCH_VENV, ignore_errors=True)
        old = os.umask(0o022)
        try:
            subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(SEARCH_VENV)], check=True, capture_output=True)
            site = next((SEARCH_VENV / "lib").glob("python3*/site-packages"))
            guard_site = next((JOB_VENV / "lib").glob("python3*/site-packages"))
            (site / "mnist-hpc-guard-venv.pth").write_text(f"{guard_site}\n")
            result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"optuna=={version}"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"pip install optuna=={version} failed:\n{result.stderr[-2000:]}")
            marker.write_text(version)
        finally:
            os.umask(old)
    gated = SEARCH_VENV / "bin" / "gated-python"
    if not gated.exists() or gated.read_text() != GATED_PYTHON:
        gated.write_text(GATED_PYTHON)
        os.chmod(gated, 0o755)
    return gated


@pytest.mark.slow
def test_another_user_cannot_make_a_search_worker_run_their_target():
    need(os.geteuid() == 0, "creating users needs root")
    need(SYSTEM_PYTHON.exists() and shutil.which("useradd") is not None, "needs /usr/bin/python3 and useradd")
    ensure_users()
    python = ensure_search_venv()
    base = Path(tempfile.mkdtemp(prefix="mnist-hpc-hostile-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    worker_pid = None
    try:
        src = base / "src"
        for part in ("mnist_hpc", "conf", "hydra_plugins"):
            shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
        gates = base / "gates"
        gates.mkdir(mode=0o755)
        (base / "attack.py").write_text(ATTACK)
        cache = base / "cache"
        fill_cache(cache)
        subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)
        project = base / "project"
        project.mkdir()
        shutil.chown(project, group=GROUP)
        os.chmod(project, 0o2775)
        homes = {}
        for user in USERS:
            homes[user] = base / f"home-{user}"
            homes[user].mkdir()
            os.chown(homes[user], pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)

        def as_user(user: str, *args: str) -> subprocess.CompletedProcess:
            env = {"PATH": "/usr/bin:/bin", "HOME": str(homes[user]), "PYTHONPATH": str(src), "LANG": "C.UTF-8",
                   "PYTHONDONTWRITEBYTECODE": "1", "MNIST_HPC_TEST_GATE": str(gates)}
            out, err = homes[user] / "out.txt", homes[user] / "err.txt"
            with open(out, "w") as fo, open(err, "w") as fe:
                proc = subprocess.run([str(python), *args], user=user, group=user, extra_groups=[GROUP], umask=0o002,
                                      env=env, cwd=homes[user], stdout=fo, stderr=fe, timeout=300)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())

        bashrc = homes[A] / ".bashrc"
        as_user(A, "-c", f"open({str(bashrc)!r}, 'w').write('# A\\n')")
        search = project / "search"
        submitted = as_user(A, "-c", "from mnist_hpc.cli import train_main; train_main()", "-m", "hparams_search=optuna",
                            "hydra/launcher=local", f"hydra.sweep.dir={search}",
                            *tiny_overrides(cache, project / "out"), "hydra.sweeper.workers=1", "hydra.sweeper.n_trials=2")
        if submitted.returncode != 0:
            raise RuntimeError(submitted.stderr[-3000:])
        worker_pid = submitted.stdout.split("on local: ", 1)[1].split()[0]
        # B, before A's worker starts: B's own search.json in place of A's, and B's file to copy.
        payload = project / "payload"
        as_user(B, "-c", f"open({str(payload)!r}, 'w').write('echo B ran this as $(id -un)\\n')")
        attacked = as_user(B, str(base / "attack.py"), str(search / "search.json"), str(payload), str(bashrc))
        if attacked.returncode != 0:
            raise RuntimeError(attacked.stderr)
        (gates / worker_pid).touch()
        deadline = time.monotonic() + 300
        while (search / ".submitit" / worker_pid / f"{worker_pid}_0_result.pkl").exists() is False:
            if time.monotonic() > deadline:
                raise RuntimeError("A's worker did not end")
            time.sleep(0.5)
        assert bashrc.read_text() == "# A\n", f"A's worker copied B's file over A's ~/.bashrc: {bashrc.read_text()!r}"
    finally:
        if worker_pid is not None:  # the worker's controller and its task, if still there, by their ids
            try:
                children = Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()
            except OSError:
                children = []
            for pid in [*children, worker_pid]:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
        shutil.rmtree(base, ignore_errors=True)
