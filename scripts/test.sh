#!/usr/bin/env bash
# One command runs the whole test suite: installs the package with CPU TensorFlow and its test
# extra, starts the local single-node Slurm cluster (root on Debian; see slurm/cluster.sh), then
# runs pytest. Arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`. The fast tier (no
# training, no cluster) needs none of this: `python -m pytest -m "not slurm and not slow"`.
#
# Installs into the active venv (or conda env); with none active, into the project's own venv
# (.venv in the checkout, or $MNIST_HPC_VENV), made on first use. PYTHON=/path/to/python uses
# that interpreter as it is. See scripts/python-env.sh.
#
# Without root the cluster cannot be started here; the Slurm tests then skip locally and fail
# under CI=true, where a missing cluster is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh
mnist_hpc_python

"$PYTHON" -m pip install --quiet -e ".[cpu,test]"
if [ "$(id -u)" = 0 ]; then
    slurm/cluster.sh start
elif [ "${CI:-}" = true ]; then
    echo "test.sh: CI needs root to start the Slurm cluster" >&2
    exit 1
fi

# A Slurm daemon that crashes under a test (slurmd has segfaulted here, once in many runs) is
# started again by tests/conftest.py, which lists the tests that failed under it in this file,
# and only when nothing else failed; those tests then run once more, in a new pytest process.
rerun_file="$(mktemp)"
trap 'rm -f "$rerun_file"' EXIT
status=0
MNIST_HPC_RERUN_FILE="$rerun_file" "$PYTHON" -m pytest "$@" || status=$?
if [ "$status" = 1 ] && [ -s "$rerun_file" ]; then
    mapfile -t crashed < "$rerun_file"
    echo "test.sh: a Slurm daemon died under ${#crashed[@]} failed test(s); running them once more:" >&2
    printf '  %s\n' "${crashed[@]}" >&2
    status=0
    "$PYTHON" -m pytest "${crashed[@]}" || status=$?
fi
exit "$status"
