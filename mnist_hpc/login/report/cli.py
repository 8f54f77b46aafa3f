"""``mnist-hpc-report``: its command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from mnist_hpc.login.report.build import build_report
from mnist_hpc.login.report.ranking import METRICS
from mnist_hpc.login.trials import TargetError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-hpc-report",
        description=(
            "Summarise a sweep (or one run): a table of every trial with its state, epochs and accuracies, "
            "the best trial by validation accuracy, learning curves, metric-vs-hyperparameter plots, and the "
            "best trial's confusion matrix and most confidently wrong digits. Works while the sweep runs."
        ),
    )
    parser.add_argument("target", metavar="SWEEP_DIR|RUN_DIR", type=Path, help="a sweep directory or a run directory")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <target>/report)")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="val_accuracy",
        help="rank trials by the best epoch's validation accuracy (default) or by test accuracy "
        "(only for inspection: choosing by test accuracy is not model selection)",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = build_report(args.target, args.out, args.metric)
    except TargetError as exc:
        print(f"mnist-hpc-report: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"mnist-hpc-report: error: cannot write the report ({exc}); pass --out with a writable directory",
            file=sys.stderr,
        )
        return 1
    print(report.markdown, end="")
    if report.selection is not None and report.selection.warning:
        print(f"mnist-hpc-report: warning: {report.selection.warning}", file=sys.stderr)
    print(f"mnist-hpc-report: wrote {len(report.files)} files to {report.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
