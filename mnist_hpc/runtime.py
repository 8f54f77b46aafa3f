"""Facts about the process a job runs in (Slurm allocation, host), read once at the entry point.

Stage functions take a :class:`RuntimeInfo` instead of reading environment variables themselves.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from typing import Mapping, Optional


def _int_or_none(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


@dataclass(frozen=True)
class RuntimeInfo:
    hostname: str
    slurm_job_id: Optional[str] = None
    slurm_array_job_id: Optional[str] = None
    slurm_array_task_id: Optional[str] = None
    slurm_cpus_per_task: Optional[int] = None
    slurm_restart_count: int = 0

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "RuntimeInfo":
        env = os.environ if environ is None else environ
        return cls(
            hostname=socket.gethostname(),
            slurm_job_id=env.get("SLURM_JOB_ID") or None,
            slurm_array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
            slurm_array_task_id=env.get("SLURM_ARRAY_TASK_ID") or None,
            slurm_cpus_per_task=_int_or_none(env.get("SLURM_CPUS_PER_TASK")),
            slurm_restart_count=_int_or_none(env.get("SLURM_RESTART_COUNT")) or 0,
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
