"""The Hydra launcher on submitit (login node): options, composition, checks, submission.

- :mod:`.options`: ``hydra.launcher.*``, their defaults and how they reach submitit;
- :mod:`.compose`: every job's config, composed once and checked;
- :mod:`.preflight`: what is checked before anything is queued;
- :mod:`.submit`: queueing one array, recording each run's ``job.json``, the summary.

What the queued jobs run on the compute node is :mod:`mnist_hpc.compute.job`.
"""
