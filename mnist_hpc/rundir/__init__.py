"""The run directory: every file a run leaves, named, written and read through this module.

One run (a single training, or one trial of a sweep) owns one directory::

    <run dir>/
      identity.json     once, by the first submission or run: the config this directory is bound to
      job.json          at submission (launcher): job id, array task, trial, overrides, log paths
      lease.json        while a job writes the directory: which job (or host and pid); .lease.lock guards it
      config.yaml       at start: the resolved, typed config
      .hydra/           at start: Hydra's own copy of the config and overrides.yaml
      progress.json     at start and after every epoch: epochs done and planned, history so far
      checkpoints/      resume state: ckpt-e<epochs>-b<batches>.npz (format: mnist_hpc.compute.checkpoint)
      tensorboard/      TensorBoard's event files, one step per epoch (mnist_hpc.compute.tensorboard)
      train.log         the job log, for people: nothing parses it
      predictions.npz   at the end: test labels, probabilities, the worst mistakes as images
      history.csv       at the end: the per-epoch history
      model.keras       at the end: the trained model
      provenance.json   at the end: versions, host, Slurm ids, data hash, commit, times
      metrics.json      last: its presence marks a finished run
      failure.json      when the run raised: the error line; removed when a new attempt starts

Writers are atomic (see :mod:`mnist_hpc.io`). Readers never raise on a damaged file: they
return what can be used and a note naming the file (other people's processes write these
files, and one bad file must not stop a status or a report of a hundred trials).
:func:`read_run` gathers a run's files and :func:`run_state` is the one place where a run's
state is derived from its files and its scheduler's view.

The package's parts: :mod:`.files` (names, checkpoints' names and listing, submitit's result
pickle, and the guarded JSON reader), :mod:`.records` (what describes a run: job, identity,
lease and its lock, config, progress, failure, a retry's seed), :mod:`.outputs` (what a finished
run leaves), :mod:`.state` (reading a run's files together and deriving its state). Policies that
use these files live elsewhere: who may write a directory in :mod:`mnist_hpc.claim`, what a
checkpoint holds in :mod:`mnist_hpc.compute.checkpoint`.
Everything is used as ``rundir.<name>``.

Light to import (login-node status and report use it): numpy only inside the functions that
handle arrays, TensorFlow only inside :func:`save_model`.
"""

from mnist_hpc.rundir.files import *  # noqa: F401,F403
from mnist_hpc.rundir.files import __all__ as _files
from mnist_hpc.rundir.outputs import *  # noqa: F401,F403
from mnist_hpc.rundir.outputs import __all__ as _outputs
from mnist_hpc.rundir.records import *  # noqa: F401,F403
from mnist_hpc.rundir.records import __all__ as _records
from mnist_hpc.rundir.state import *  # noqa: F401,F403
from mnist_hpc.rundir.state import __all__ as _state

__all__ = [*_files, *_records, *_outputs, *_state]
