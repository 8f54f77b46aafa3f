#!/usr/bin/env bash
# Mutation testing of the modules that enforce the invariants (issue 21, I11), with mutmut 3.
# Not part of CI: a run takes about an hour on two CPUs.
#
#   scripts/mutation.sh [REV]            mutate the tree of commit REV (default HEAD)
#   MUTATION_JOBS=2                      mutants tested at once (default 2)
#   MUTATION_JSON=path                   also write the results as JSON there
#   MUTATION_WORKDIR=dir                 work there (default: a new directory under $TMPDIR)
#   MUTATION_EXTRA=1                     mutate rundir's files, records, outputs and login/study.py too
#
# The tree of REV is copied out of git into a work directory outside the checkout (mutmut writes
# its mutants/ directory and caches there; nothing is left in the checkout). mutmut 3 copies the
# package into mutants/, rewrites each function of the mutated modules into its mutants behind a
# trampoline and runs, in a forked process per mutant, only the selected tests that called that
# function. The modules and the test selection (the fast in-process tier: no Slurm, no training,
# no subprocess, whose fresh interpreter would import the unmutated package and so could never
# kill a mutant) are in scripts/mutation.py, which also writes the config and prints the score.
# Then the module-level mutants mutmut cannot make (scripts/mutation.py's HAND_MUTANTS, the
# issue's four among them) are applied one at a time and the same tests run. Exit 1 when a
# mutant survives without a reason in benchmarks/results/mutation-equivalent.json.
# Installs mutmut into the project's environment if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python-env.sh
mnist_hpc_python

MUTMUT_VERSION=3.8.1
if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('mutmut') != '$MUTMUT_VERSION')" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "mutmut==$MUTMUT_VERSION"
fi
mutmut="$(dirname "$PYTHON")/mutmut"

rev=${1:-HEAD}
commit=$(git rev-parse --verify "$rev^{commit}")
work=${MUTATION_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/mnist-hpc-mutation.XXXXXX")}
mkdir -p "$work"
git archive "$commit" | tar -x -C "$work"
"$PYTHON" scripts/mutation.py configure "$work"
echo "mutation.sh: mutating $commit in $work (mutmut $MUTMUT_VERSION, ${MUTATION_JOBS:-2} at once)" >&2
(cd "$work" && "$mutmut" run --max-children "${MUTATION_JOBS:-2}" > mutmut-run.log 2>&1) || {
    echo "mutation.sh: mutmut failed; the end of $work/mutmut-run.log:" >&2
    tail -40 "$work/mutmut-run.log" >&2
    exit 1
}
echo "mutation.sh: mutants and logs stay in $work (inspect one: cd $work && $mutmut show NAME)" >&2
status=0
"$PYTHON" scripts/mutation.py report "$work" --commit "$commit" ${MUTATION_JSON:+--json "$MUTATION_JSON"} || status=1
# The module-level mutants mutmut does not make, applied by hand to a fresh copy of the same tree.
rm -rf "$work/hand" && mkdir "$work/hand" && git archive "$commit" | tar -x -C "$work/hand"
"$PYTHON" scripts/mutation.py hand "$work/hand" || status=1
exit $status
