"""Compute-node code: what a job unpickles and runs (load, model, engine, train, checkpoint).

Imports TensorFlow and Keras inside the functions that need them, never at module level, so
the launcher can import :mod:`mnist_hpc.compute.job` to build jobs without paying for them.
"""
