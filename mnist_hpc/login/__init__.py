"""Login-node code: prefetch, submission, status and report. Nothing here imports TensorFlow."""
