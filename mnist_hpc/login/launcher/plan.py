"""A launch as the launcher plans it: its jobs (:class:`PlannedJob`) and its refusal (:class:`PreflightError`).

Shared by composing (:mod:`.compose`), checking (:mod:`.preflight`), packing (:mod:`.packing`) and
submitting (:mod:`.submit`), each of which fills in its part of a planned job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.errors import CompactHydraException

from mnist_hpc.claim import Verdict
from mnist_hpc.config import Config
from mnist_hpc.contract.jobconfig import JobSpec

# Trials named in one refusal at most; the rest are counted.
MAX_NAMED = 12


class PreflightError(CompactHydraException):
    """A check before queueing failed; nothing was submitted.

    A CompactHydraException, so Hydra prints the message alone, not a traceback.
    """


@dataclass
class PlannedJob:
    """One job of a multirun, composed and checked on the login node."""

    num: int
    overrides: list[str]
    typed: Config
    run_dir: Path
    # What the compute node rebuilds the job's config from (with the launch's bases).
    spec: JobSpec
    # ``typed``, flat (mnist_hpc.config.flat_config).
    flat: dict[str, Any]
    # What the run may do in its directory (set by the preflight): new, continue, or done.
    verdict: Optional[Verdict] = None
    # Training images of its data cache, as the cache's manifest records them (set by the preflight).
    train_samples: Optional[int] = None
    # Its identity's fingerprint (mnist_hpc.claim.fingerprint), with its data (set by the preflight).
    fingerprint: Optional[str] = None
