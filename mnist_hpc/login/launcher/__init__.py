"""The Hydra launcher on submitit (login node): options, composition, checks, submission.

- :mod:`.options`: ``hydra.launcher.*``, their defaults and how they reach submitit;
- :mod:`.plan`: a launch's planned jobs and its refusal;
- :mod:`.compose`: every job's config, composed once and checked;
- :mod:`.preflight`: what is checked before anything is queued;
- :mod:`.packing`: which trials share a Slurm task;
- :mod:`.submit`: queueing one array, recording each run's ``job.json``, the summary;
- :mod:`.search`: queueing an asynchronous Optuna search's workers.

What a queued job runs is a task of :mod:`mnist_hpc.contract`; its runner is compute-node code.
"""
