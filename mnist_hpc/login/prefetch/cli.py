"""``mnist-hpc-prefetch``: the command line around :func:`~mnist_hpc.login.prefetch.fetch.prefetch`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from mnist_hpc.cache import KERAS_MNIST_URL
from mnist_hpc.dataset import DatasetError
from mnist_hpc.login.prefetch.errors import PROG, Interrupted, PrefetchError, first_line
from mnist_hpc.login.prefetch.fetch import DEFAULT_MAX_TIME_S, log, prefetch
from mnist_hpc.login.prefetch.sources import normalise_sha256


def _sha256_arg(value: str) -> str:
    try:
        return normalise_sha256(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _bounded(kind: type, minimum: float, *, inclusive: bool) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` that is >= (or >) ``minimum``."""
    relation = ">=" if inclusive else ">"

    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {relation} {minimum:g}, got {value!r}") from None
        if not (number >= minimum if inclusive else number > minimum):  # also rejects NaN
            raise argparse.ArgumentTypeError(f"must be {relation} {minimum:g}, got {value}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``mnist-hpc-prefetch`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Put a verified mnist.npz into the cache that training jobs read (data.cache_dir).\n"
            "Run it on a login node: compute nodes have no internet. Prints the cached file's path."
        ),
        epilog=(
            "Without internet: download the file elsewhere, copy it over and use --from. Examples:\n"
            f"  {PROG}\n"
            f"  {PROG} data.cache_dir=/scratch/$USER/mnist-hpc\n"
            f"  {PROG} --from ~/mnist.npz\n"
            f"  {PROG} --from ~/mnist-idx/   # train-images-idx3-ubyte(.gz) and the other three"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help=f"download from this URL (default: {KERAS_MNIST_URL})")
    where.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="PATH",
        help="import a hand-copied mnist.npz, or a directory holding the four MNIST IDX files (optionally .gz)",
    )
    parser.add_argument(
        "--sha256",
        type=_sha256_arg,
        metavar="HEX",
        help=(
            "expected sha256 of the npz (default for downloads: the hash Keras pins; "
            "with --from: checked only if given)"
        ),
    )
    parser.add_argument("--force", action="store_true", help="replace the cached file even if it is valid")
    parser.add_argument(
        "--retries",
        type=_bounded(int, 0, inclusive=True),
        default=3,
        metavar="N",
        help="retries after a transient network error (default: 3)",
    )
    parser.add_argument(
        "--backoff-s",
        type=_bounded(float, 0, inclusive=True),
        default=1.0,
        metavar="S",
        help="wait before the first retry, doubled for each further one (default: 1.0)",
    )
    parser.add_argument(
        "--timeout-s",
        type=_bounded(float, 0, inclusive=False),
        default=60.0,
        metavar="S",
        help="timeout per network request (default: 60)",
    )
    parser.add_argument(
        "--max-time-s",
        type=_bounded(float, 0, inclusive=False),
        default=DEFAULT_MAX_TIME_S,
        metavar="S",
        help=f"give up a download not finished after S seconds, retries included (default: {DEFAULT_MAX_TIME_S:g})",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Hydra overrides of the training config, e.g. data.cache_dir=/scratch/$USER/mnist-hpc",
    )
    return parser


def _describe_config_error(exc: BaseException) -> str:
    # Hydra's own message is terse ("Could not override 'data.x'") and suggests `+key=`, which
    # the schema would reject anyway; the cause (e.g. "Key 'x' not in 'DataConfig'") says more.
    lines = []
    current: Optional[BaseException] = exc
    while current is not None:
        first = first_line(current).rstrip(".")
        if first not in lines:
            lines.append(first)
        current = current.__cause__
    return "; ".join(lines)


def target_from_overrides(overrides: Sequence[str]) -> Path:
    """Compose the training config with ``overrides`` and return its cache file path.

    Uses the same YAML and schema as the training jobs, so prefetch fills exactly the file
    that they will read.

    Raises:
        mnist_hpc.config.ConfigError, hydra.errors.HydraException, omegaconf.errors.OmegaConfBaseException.
    """
    from hydra import compose, initialize_config_dir

    from mnist_hpc.cache import cache_file
    from mnist_hpc.config import conf_dir, register_configs, to_typed

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return cache_file(to_typed(cfg).data)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted`, so that the staging area is removed and
    the lock released on the way out (the default SIGTERM kills at once and leaves them)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``mnist-hpc-prefetch``; return the exit code (0 ok, 1 failure, 2 usage error)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mnist_hpc.config import ConfigError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on usage errors and --help; return the code instead
        return exc.code if isinstance(exc.code, int) else 2
    try:
        target = target_from_overrides(args.overrides)
    except (ConfigError, HydraException, OmegaConfBaseException) as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: invalid override(s) {' '.join(args.overrides)}: {_describe_config_error(exc)}",
              file=sys.stderr)
        return 2
    from mnist_hpc.io import path_problem

    if (too_long := path_problem(target, "data.cache_dir or data.filename")) is not None:
        print(f"{PROG}: error: {too_long}", file=sys.stderr)
        return 2

    # A handler per call, bound to the current stderr (tests swap it), removed afterwards.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    log.addHandler(handler)
    previous_level = log.level
    log.setLevel(logging.INFO)
    try:
        with _signals_interrupt():
            prefetch(
                target,
                url=args.url or KERAS_MNIST_URL,
                sha256=args.sha256,
                source=args.source,
                force=args.force,
                retries=args.retries,
                backoff_s=args.backoff_s,
                timeout_s=args.timeout_s,
                max_time_s=args.max_time_s,
            )
    except (PrefetchError, DatasetError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        name = signal.Signals(exc.signum).name
        print(f"{PROG}: stopped by {name}; the cache is as it was and no partial file was left", file=sys.stderr)
        return 128 + exc.signum
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)
    print(target)
    return 0

