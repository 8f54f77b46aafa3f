"""Hostile tester's second pass (issue 21, I6/I8): the checkpoint reader on the compute node.

``checkpoint.read`` opens each ``checkpoints/ckpt-*.npz`` with ``np.load`` by path: a FIFO there
(the run directory is group-writable in a shared project, by design, or a mistake) blocks the
job at its resume forever. Seen: an in-process run hung in ``open`` for ten minutes; SIGTERM was
logged ("stopping at the next step boundary") and did not end it, because the handler only sets
a flag and ``open`` is retried. Every other reader of a file another process wrote refuses what
is not a regular file (mnist_hpc.io).

Found by the second hostile pass (issue 21); the reader runs in a child process with a deadline, so that the
test itself never hangs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

READ = (
    "import sys\n"
    "from pathlib import Path\n"
    "from mnist_hpc.compute import checkpoint\n"
    "try:\n"
    "    print(checkpoint.load_latest(Path(sys.argv[1]), 'f' * 16))\n"
    "except checkpoint.CheckpointError as exc:\n"
    "    print('refused:', exc)\n"
)


def test_a_fifo_in_place_of_the_newest_checkpoint_never_blocks_the_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    os.mkfifo(run_dir / "checkpoints" / "ckpt-e00009-b0000000.npz")
    try:
        proc = subprocess.run([sys.executable, "-c", READ, str(run_dir)], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        pytest.fail("reading the checkpoints blocked on a FIFO for 30 s")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused:") and "ckpt-e00009-b0000000.npz" in proc.stdout, proc.stdout
