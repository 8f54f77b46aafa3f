#!/usr/bin/env bash
# One command on a fresh machine: install mnist-hpc, prefetch MNIST into the cache, train locally.
#
#   scripts/quickstart.sh                          # download mnist.npz (login node with internet)
#   scripts/quickstart.sh ../shared/data/mnist.npz # or import a local copy (offline machines)
#   scripts/quickstart.sh PATH train.epochs=1      # extra arguments go to mnist-hpc-train
#
# Uses the active Python environment (activate a venv first if you want one); PYTHON overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

"$PYTHON" -m pip install --quiet -e ".[test]"

source_arg=()
if [ $# -gt 0 ] && [ "${1#*=}" = "$1" ]; then
    source_arg=(--from "$1")
    shift
fi
"$PYTHON" -m mnist_hpc.login.prefetch "${source_arg[@]}"
"$PYTHON" -c 'from mnist_hpc.cli import train_main; train_main()' "$@"
