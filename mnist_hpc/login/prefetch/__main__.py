"""``python -m mnist_hpc.login.prefetch``: the same as ``mnist-hpc-prefetch``."""

import sys

from mnist_hpc.login.prefetch.cli import main

sys.exit(main())
