"""Hostile tester's second pass (issue 21, I3): a submission killed at the worst moment.

``submit_search`` opened the study (``open_study``: ``create_study`` appends to ``study.journal``)
before it wrote ``search.json``. A submission killed with SIGKILL between the two (here: at the
start of ``write_spec``) leaves a journal without ``search.json``; every later submission into that
directory is refused ("exists without search.json; use a new hydra.sweep.dir"), although nothing
was queued and no trial exists. ``open_study``'s own comment expects the other order ("a
submission that stopped between search.json and the study").

Found by the second hostile pass; search.json is now written before the journal exists. Local launcher, no training (the second submission's worker, if it is
accepted, is waited for).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


from tests.helpers import TRAIN, run_to_files, tiny_overrides, until

KILLED_AT_WRITE_SPEC = [sys.executable, "-c", (
    "import os, sys\n"
    "import mnist_hpc.search as sd\n"
    "sd.write_spec = lambda *a, **k: os.kill(os.getpid(), 9)  # SIGKILL at the worst moment\n"
    "sys.argv = ['mnist-hpc-train'] + sys.argv[1:]\n"
    "from mnist_hpc.cli import train_main; train_main()\n"
)]


@pytest.mark.slow  # the second submission's worker trains its trial
def test_a_search_submission_killed_before_search_json_can_be_submitted_again(synthetic_cache: Path,
                                                                               tmp_path: Path) -> None:
    from mnist_hpc import search as sd

    search_dir = tmp_path / "search"
    args = ["-m", "hparams_search=optuna", "hydra/launcher=local", "hydra.sweeper.n_trials=1", "hydra.sweeper.workers=1",
            *tiny_overrides(synthetic_cache, tmp_path / "out"), f"hydra.sweep.dir={search_dir}"]
    killed = run_to_files([*KILLED_AT_WRITE_SPEC, *args], tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (search_dir / sd.SPEC_FILE).exists() and sd.trial_numbers(search_dir) == []
    again = run_to_files([*TRAIN, *args], tmp_path)
    if again.returncode == 0:
        beats = lambda: [b for b, _ in sd.read_beats(search_dir)[0]]  # noqa: E731
        until(lambda: beats() and all(b.state in ("done", "stopped") for b in beats()), "the search worker to end")
    assert again.returncode == 0, again.stderr[-2000:]
