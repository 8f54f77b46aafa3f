"""The login/compute contract: what the login node hands a job, and what the job checks before it runs.

Both sides import it, and it imports neither (``tests/test_layout.py``):

- :mod:`.tasks`: the tasks a job runs (a trial, packed trials, a search worker, a report) and the
  launch they share, each naming the runner that executes it;
- :mod:`.entry`: :class:`~.entry.JobEntry`, the one object submitit unpickles: it checks the
  environment, then runs its task;
- :mod:`.jobconfig`: a job's config as the login node checked it, and its rebuilding on the node;
- :mod:`.guard`: the job's files are private to its user, and checked before anything is unpickled.
"""
