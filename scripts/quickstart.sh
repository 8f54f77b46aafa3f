#!/usr/bin/env bash
# One command on a fresh machine: install mnist-hpc (CPU TensorFlow), prefetch MNIST into the
# cache, train locally.
#
#   scripts/quickstart.sh                          # download mnist.npz (login node with internet)
#   scripts/quickstart.sh ../shared/data/mnist.npz # or import a local copy (offline machines)
#   scripts/quickstart.sh PATH train.epochs=1      # extra arguments go to mnist-hpc-train
#
# Installs into the active venv (or conda env); with none active, into the project's own venv
# (.venv in the checkout, or $MNIST_HPC_VENV), made on first use. PYTHON=/path/to/python uses
# that interpreter as it is. See scripts/python-env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh
mnist_hpc_python

"$PYTHON" -m pip install --quiet -e ".[cpu]"

source_arg=()
if [ $# -gt 0 ] && [ "${1#*=}" = "$1" ]; then
    source_arg=(--from "$1")
    shift
fi
# The entry points behind mnist-hpc-prefetch and mnist-hpc-train, run by $PYTHON itself (its
# scripts directory need not be on PATH when PYTHON is given).
"$PYTHON" -c 'from mnist_hpc.cli import prefetch_main; prefetch_main()' "${source_arg[@]}"
"$PYTHON" -c 'from mnist_hpc.cli import train_main; train_main()' "$@"
