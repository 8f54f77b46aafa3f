"""Compute-node code: what a job runs (load, model, engine, train, checkpoint, search worker).

:mod:`.run` is the training entry (the Hydra task); :mod:`.job` and :mod:`.search` run the tasks the
launcher hands over through :mod:`mnist_hpc.contract`. TensorFlow and Keras are imported inside the
functions that need them, never at module level. Nothing here imports the login node's code.
"""
