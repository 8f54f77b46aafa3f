"""mnist-hpc: the Keras MNIST lesson as verified, resumable Slurm batch work.

The pipeline, one module per stage:
prefetch (login node) -> cache -> data (compute node) -> model -> train -> outputs -> report.
Nothing imported here pulls in TensorFlow; compute-node modules import it inside functions.
"""

__version__ = "0.1.0"
