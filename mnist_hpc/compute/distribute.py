"""One training across the tasks of a Slurm job: TensorFlow's MultiWorkerMirroredStrategy.

:func:`start` returns the :class:`Workers` a training runs with: :class:`SingleProcess` (the
default; no strategy, the single-process compiled loop as it always was) or
:class:`MultiWorker`, where every Slurm task is one worker of a synchronous data-parallel
training. Each worker keeps the whole uint8 training set from the same verified cache in
memory and gathers only its own share of each global batch (``train.batch_size`` rows split
evenly across the workers), so the epoch order stays a function of (seed, epoch). Gradients
are averaged over the global batch by TensorFlow's collectives (ring all-reduce over gRPC on
CPU nodes, NCCL on GPU nodes), inside the optimizer's ``apply_gradients``.

Keras 3's ``model.fit`` cannot run under this strategy (keras #20585): the training runs
through :class:`~mnist_hpc.compute.multi_worker_loop.DistributedLoop`, the compiled loop with
Keras' own loss, metrics and optimizer.

Only worker 0, the chief, writes the run's files; every worker takes part in every
collective (checkpoint snapshots read summed metrics, the stop decision is all-reduced), so
the chief's extra work (validation, writing) never contains one. A worker that dies or hangs
ends the job: TensorFlow's collectives fail on a reset connection, a missed heartbeat or
``train.collective_timeout_s``, and :class:`WorkerFailure` names the worker.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import numpy as np

from mnist_hpc import rundir
from mnist_hpc.compute.cluster import TaskLayout
from mnist_hpc.compute.engine import CompiledLoop
from mnist_hpc.compute.runtime import RuntimeInfo
from mnist_hpc.config import Distribution, TrainConfig

log = logging.getLogger(__name__)

_TASK = re.compile(r"/job:worker/(?:replica:\d+/)?task:(\d+)")


class WorkerFailure(RuntimeError):
    """Another worker died, hung or became unreachable; the training cannot continue."""

    def __init__(self, message: str, failed_rank: Optional[int]) -> None:
        super().__init__(message)
        self.failed_rank = failed_rank


def peer_failure(exc: BaseException, layout: TaskLayout, timeout_s: int, runtime: RuntimeInfo) -> Optional[WorkerFailure]:
    """A TensorFlow error caused by another worker, as a :class:`WorkerFailure`; None otherwise."""
    import tensorflow as tf

    if not isinstance(exc, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                            tf.errors.CancelledError)):
        return None
    text = str(exc)
    others = [int(t) for t in _TASK.findall(text) if int(t) != layout.rank and int(t) < layout.num_workers]
    failed = others[0] if others else None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line for line in lines if "aborted by" in line or "unhealthy" in line), lines[0] if lines else "")
    if isinstance(exc, tf.errors.DeadlineExceededError):
        reason = f"a collective did not complete within train.collective_timeout_s={timeout_s} s ({reason[:200]})"
    who = layout.describe(failed) if failed is not None else "another worker"
    where = runtime.task_log(failed) if failed is not None else "the other tasks' logs"
    return WorkerFailure(
        f"{who} died, hung or became unreachable: {reason[:300]}. The training stopped on "
        f"{layout.describe(layout.rank)}. Why that worker stopped: {where}",
        failed,
    )


def writes_failure(exc: BaseException, runtime: RuntimeInfo) -> bool:
    """Whether this process records ``exc`` in ``failure.json``.

    The chief (or a lone process) does; another worker only when the chief is the one that
    failed, since nobody else would. The others' own errors are in their logs, and the chief
    names them when their collectives break.
    """
    if not runtime.is_worker_task:
        return True
    return isinstance(exc, WorkerFailure) and exc.failed_rank == 0


class Workers(Protocol):
    """What training needs from its workers; :class:`SingleProcess` is the trivial case."""

    is_chief: bool
    distribution: Distribution
    num_workers: int

    def scope(self) -> Any:
        """Build the model and optimizer inside this context."""

    def make_loop(self, model: Any, x: np.ndarray, y: np.ndarray, batch_size: int, steps_per_call: int, jit: bool) -> Any:
        """The compiled loop that trains ``model`` on (x, y)."""

    def plain_model(self, model: Any) -> Any:
        """A copy of ``model`` (weights, optimizer state) that evaluates and saves without collectives (chief)."""

    def agreed_signal(self, signum: Optional[int]) -> Optional[int]:
        """The stop signal any worker received (SIGTERM over USR2); None if none did."""

    def check_same(self, what: str, values: list[int]) -> None:
        """Raise unless every worker holds the same ``values``."""

    def share(self, values: list[float]) -> list[float]:
        """Wait for every worker; all return the chief's ``values`` (the others pass as many zeros)."""

    def failures(self) -> Any:
        """A context that turns errors caused by another worker into :class:`WorkerFailure`."""

    def describe(self) -> dict[str, Any]:
        """For provenance and metrics: the strategy and where its workers ran."""


class SingleProcess:
    """One process, no strategy: the single-process path exactly as it was."""

    is_chief = True
    distribution = Distribution.none
    num_workers = 1

    def scope(self) -> Any:
        return contextlib.nullcontext()

    def make_loop(self, model: Any, x: np.ndarray, y: np.ndarray, batch_size: int, steps_per_call: int, jit: bool) -> Any:
        return CompiledLoop(model, x, y, batch_size, steps_per_call, jit)

    def plain_model(self, model: Any) -> Any:
        return model

    def agreed_signal(self, signum: Optional[int]) -> Optional[int]:
        return signum

    def check_same(self, what: str, values: list[int]) -> None:
        return None

    def share(self, values: list[float]) -> list[float]:
        return values

    def failures(self) -> Any:
        return contextlib.nullcontext()

    def describe(self) -> dict[str, Any]:
        return {"strategy": Distribution.none.value, "workers": 1}


class MultiWorker:
    """This process as one worker of a MultiWorkerMirroredStrategy over the job step's tasks."""

    distribution = Distribution.multi_worker

    def __init__(
        self, layout: TaskLayout, train: TrainConfig, build: Callable[[], Any], run_dir: Path, runtime: RuntimeInfo
    ) -> None:
        import tensorflow as tf

        self.layout = layout
        self.runtime = runtime
        self.is_chief = layout.is_chief
        self.num_workers = layout.num_workers
        self.timeout_s = train.collective_timeout_s
        self._build = build
        self._plain: Optional[Any] = None
        layout.check_hosts_resolve()
        layout.check_port_free()
        # Its INFO lines report every all-reduce it sets up: noise in a job log.
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": layout.addresses}), task_type="worker", task_id=layout.rank, rpc_layer="grpc"
        )
        # AUTO: ring all-reduce over gRPC on CPU, NCCL on GPUs.
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=float(self.timeout_s))
        log.info(
            "joining %d workers as %s (%s); waiting at most %d s for the others",
            layout.num_workers,
            layout.describe(layout.rank),
            ", ".join(layout.addresses),
            self.timeout_s,
        )
        # TensorFlow waits for every worker to join inside C++, holding the GIL and ignoring
        # its own registration timeout here: faulthandler's C-level watchdog bounds that wait.
        # It can only exit, so the chief records beforehand why the job would end there, and
        # takes it back once everyone has joined.
        if self.is_chief:
            rundir.write_failure(run_dir, WorkerFailure(
                f"not all {layout.num_workers} workers joined within train.collective_timeout_s={self.timeout_s} s "
                f"({', '.join(layout.addresses)}): one failed to start or its node is unreachable; see each Slurm "
                "task's log", None))
        faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=sys.stderr)
        try:
            self.strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
        finally:
            faulthandler.cancel_dump_traceback_later()
        if self.is_chief:
            rundir.clear_failure(run_dir)
        if self.strategy.num_replicas_in_sync < layout.num_workers:
            raise WorkerFailure(f"only {self.strategy.num_replicas_in_sync} of {layout.num_workers} workers joined", None)

        @tf.function
        def all_sum(value: Any) -> Any:
            def replica(v: Any) -> Any:
                return tf.distribute.get_replica_context().all_reduce("sum", tf.identity(v))

            return self.strategy.experimental_local_results(self.strategy.run(replica, args=(value,)))[0]

        self._all_sum = all_sum

    def _sum(self, values: list[float]) -> np.ndarray:
        import tensorflow as tf

        return self._all_sum(tf.constant(values, dtype=tf.float64)).numpy()

    def scope(self) -> Any:
        return self.strategy.scope()

    def make_loop(self, model: Any, x: np.ndarray, y: np.ndarray, batch_size: int, steps_per_call: int, jit: bool) -> Any:
        from mnist_hpc.compute.multi_worker_loop import DistributedLoop

        return DistributedLoop(self.strategy, model, x, y, batch_size, steps_per_call, jit)

    def plain_model(self, model: Any) -> Any:
        if self._plain is None:
            # Built outside the strategy's scope: its variables are plain, so evaluate, predict
            # and save run on the chief alone, with no collective the other workers would miss.
            self._plain = self._build()
            self._plain.optimizer.build(self._plain.trainable_variables)
        self._plain.set_weights(model.get_weights())
        # The optimizer's state too (iteration count, slots), so that the model.keras saved from
        # this copy continues training where the run stands. Its variables are mirrored: each
        # worker reads its own copy, no collective.
        mine, theirs = self._plain.optimizer.variables, model.optimizer.variables
        assert [tuple(v.shape) for v in mine] == [tuple(v.shape) for v in theirs], "one build() made both optimizers"
        for variable, value in zip(mine, theirs):
            variable.assign(value.numpy())
        return self._plain

    def agreed_signal(self, signum: Optional[int]) -> Optional[int]:
        import signal

        usr2, term = self._sum([float(signum == signal.SIGUSR2), float(signum == signal.SIGTERM)])
        if term > 0:
            return int(signal.SIGTERM)
        return int(signal.SIGUSR2) if usr2 > 0 else None

    def check_same(self, what: str, values: list[int]) -> None:
        total = self._sum([float(v) for v in values] + [float(v) ** 2 for v in values])
        n, k = self.num_workers, len(values)
        # Equal everywhere exactly when each value's variance across workers is zero.
        if any(abs(total[k + i] * n - total[i] ** 2) > 0.5 for i in range(k)):
            raise WorkerFailure(
                f"the workers disagree on {what} (this worker: {values}); they read different files from the run "
                "directory: it must be on a filesystem every node sees the same way",
                None,
            )

    def share(self, values: list[float]) -> list[float]:
        # A sum in which only the chief's terms are not zero: the chief's values, bit for bit.
        return [float(v) for v in self._sum([float(v) if self.is_chief else 0.0 for v in values])]

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            failure = peer_failure(exc, self.layout, self.timeout_s, self.runtime)
            if failure is None:
                raise
            raise failure from exc

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": Distribution.multi_worker.value,
            "workers": self.num_workers,
            "rank": self.layout.rank,
            "hosts": list(self.layout.hosts),
            "ports": list(self.layout.ports),
        }


def start(
    train: TrainConfig,
    layout: Optional[TaskLayout],
    distribution: Distribution,
    build: Callable[[], Any],
    run_dir: Path,
    runtime: RuntimeInfo,
) -> Workers:
    """The workers for a resolved ``distribution`` (see :func:`mnist_hpc.compute.cluster.resolve_distribution`).

    ``build`` makes the compiled model (the chief's plain copy for evaluation); ``run_dir`` is
    where the chief records why the job ends if the workers never all join.
    """
    if distribution is Distribution.none:
        return SingleProcess()
    if layout is None:
        log.info("train.distribution=multi_worker in a step of one task: it trains alone")
        return SingleProcess()
    return MultiWorker(layout, train, build, run_dir, runtime)
