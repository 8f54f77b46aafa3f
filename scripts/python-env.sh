# Sourced by scripts/quickstart.sh and scripts/test.sh: choose the Python that mnist-hpc is
# installed into and run with, in this order:
#
#   PYTHON=/path/to/python      exactly that interpreter, as it is (nothing is made)
#   an active venv or conda env its python
#   otherwise                   the project's own venv, made on first use: $MNIST_HPC_VENV,
#                               default <checkout>/.venv, from the python3 on PATH
#
# Why a venv of our own: Debian 12 and Ubuntu 24.04 mark their python3 as externally managed
# (PEP 668), so `python3 -m pip install` into it fails with `externally-managed-environment`.
# The venv is then put first on PATH, as `activate` would, so that the installed commands and
# the jobs they start (plain sbatch scripts run `mnist-hpc-train`) find this environment.

# Print a message on stderr, prefixed with the calling script's name.
_mnist_hpc_say() {
    echo "${0##*/}: $*" >&2
}

# Sets PYTHON; makes the project's venv when no environment is active. Exits on what it cannot fix.
mnist_hpc_python() {
    if [ -n "${PYTHON:-}" ]; then
        return 0
    fi
    if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
        PYTHON="$VIRTUAL_ENV/bin/python"
        return 0
    fi
    if [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
        PYTHON="$CONDA_PREFIX/bin/python"
        return 0
    fi

    local venv="${MNIST_HPC_VENV:-$PWD/.venv}"
    if [ -e "$venv" ]; then
        # A venv interrupted while being made has a python but no pip: not one to install into.
        if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
            _mnist_hpc_say "$venv exists but is not a working virtual environment (no python with pip in it)."
            _mnist_hpc_say "remove it (rm -rf '$venv') and run again, or activate another environment first."
            exit 1
        fi
        _mnist_hpc_say "no virtual environment is active: using the project's, $venv"
    else
        _mnist_hpc_make_venv "$venv"
    fi
    PYTHON="$venv/bin/python"
    VIRTUAL_ENV="$venv"
    PATH="$venv/bin:$PATH"
    export VIRTUAL_ENV PATH
}

# Makes the venv at $1 from the python3 on PATH, or says what to install first.
_mnist_hpc_make_venv() {
    local venv=$1 base version
    if ! base=$(command -v python3); then
        _mnist_hpc_say "no python3 on PATH: install Python 3.10 or newer, or set PYTHON=/path/to/python."
        exit 1
    fi
    version=$("$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        _mnist_hpc_say "$base is Python $version; mnist-hpc needs 3.10 or newer (set PYTHON=/path/to/python3.10+)."
        exit 1
    fi
    # Debian and Ubuntu ship venv's ensurepip in a separate package; without it `python3 -m venv`
    # fails half way and leaves a venv without pip behind.
    if ! "$base" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo="sudo "
        _mnist_hpc_say "no virtual environment is active, and $base (Python $version) cannot make one: its venv module is missing."
        if command -v apt-get >/dev/null 2>&1; then
            _mnist_hpc_say "install it with:  ${sudo}apt install python$version-venv"
        else
            _mnist_hpc_say "install your distribution's venv package for Python $version, or activate an environment first."
        fi
        _mnist_hpc_say "then run this command again."
        exit 1
    fi
    _mnist_hpc_say "no virtual environment is active: making one for mnist-hpc at $venv (Python $version from $base)"
    if ! "$base" -m venv "$venv"; then
        rm -rf "$venv"
        _mnist_hpc_say "could not make the virtual environment at $venv (see above); nothing was installed."
        exit 1
    fi
    # Keep the venv out of `git status` when it sits in the checkout (as virtualenv does).
    echo '*' >"$venv/.gitignore"
    _mnist_hpc_say "made $venv; to use mnist-hpc's commands afterwards:  source $venv/bin/activate"
}
