"""The mutation-testing run of scripts/mutation.sh: what is mutated, which tests run, and the score.

``configure WORK`` writes mutmut's config (``setup.cfg``) into the work directory holding a copy
of the tree; ``report WORK`` reads mutmut's results there and prints the score per module and
every mutant not killed, each with its diff and, where benchmarks/results/mutation-equivalent.json
gives one, why it is equivalent (or only changes a message's wording). Exits 1 when a survivor has
no reason recorded there.

Why mutmut 3 and this test selection: mutmut runs each mutant in a process forked from the one
that ran the tests, and only the tests that called the mutated function (a few seconds a mutant
on two CPUs); cosmic-ray would run a whole test command per mutant. Its limits, said where the
results are shown: module-level code (such as the schema's ``KeyFacts`` in config.py) is not mutated,
and a test that runs our code in a subprocess imports the unmutated package, so it cannot kill
anything. The selection is therefore the fast in-process tier: tests of these modules that need
neither Slurm nor training nor a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EQUIVALENT = REPO / "benchmarks" / "results" / "mutation-equivalent.json"

# The modules that enforce the invariants (issue 21): who may write a run directory, the checks
# before anything is queued, what a dataset and its cache are, checkpoints, a run's state from its
# files, the ranking, and the search directory. (rundir's files, records and outputs, whose range
# checks decide which numbers are shown, and login/study.py would add 1,709 mutants to these
# 3,035: MUTATION_EXTRA=1 includes them.)
MODULES = (
    "mnist_hpc/claim.py",
    "mnist_hpc/login/launcher/preflight.py",
    "mnist_hpc/dataset.py",
    "mnist_hpc/cache.py",
    "mnist_hpc/compute/checkpoint.py",
    "mnist_hpc/rundir/state.py",
    "mnist_hpc/login/report/ranking.py",
    "mnist_hpc/search.py",
)
EXTRA_MODULES = (
    "mnist_hpc/rundir/files.py",
    "mnist_hpc/rundir/records.py",
    "mnist_hpc/rundir/outputs.py",
    "mnist_hpc/login/study.py",
)


def modules() -> tuple[str, ...]:
    """The modules this run mutates."""
    return MODULES + (EXTRA_MODULES if os.environ.get("MUTATION_EXTRA") == "1" else ())

# The fast in-process tier of these modules' tests (whole files, or single tests of files that
# otherwise train or run the commands in subprocesses). Entries whose file the mutated tree
# lacks (tests/test_boundaries.py before it existed) are left out.
TESTS = (
    "tests/test_boundaries.py",
    "tests/test_claim.py::test_identity_ignores_where_and_how_fast_but_not_what",
    "tests/test_claim.py::test_a_holder_without_a_usable_process_id_cannot_be_told_alive_or_dead",
    "tests/test_data.py",
    "tests/test_cache_format.py",
    "tests/test_cache_prefetch.py",
    "tests/test_rundir.py",
    "tests/test_readers.py",
    "tests/test_report.py",
    "tests/test_status.py::test_sacct_output_recorded_on_the_cluster_is_parsed",
    "tests/test_status.py::test_squeue_output_recorded_on_the_cluster_is_parsed",
    "tests/test_status.py::test_malformed_client_lines_are_skipped",
    "tests/test_trial_dirs.py::test_each_trial_gets_its_own_directory_inside_the_sweep",
    "tests/test_search.py::test_params_use_hydra_optuna_sweeper_syntax",
    "tests/test_search.py::test_a_requeued_worker_resumes_its_own_running_trial",
    "tests/test_search.py::test_an_abandoned_trial_is_interrupted_and_retried_once",
    "tests/test_search.py::test_a_trial_whose_worker_is_known_gone_is_retried_at_once",
    "tests/test_search.py::test_the_budget_counts_finished_trials_and_waits_only_for_quiet_workers",
    "tests/test_search.py::test_a_trial_trained_on_other_data_is_not_told",
    "tests/test_search.py::test_a_damaged_search_json_is_a_clear_error",
    "tests/test_search_journal.py",
    "tests/test_search_readers.py",
    "tests/test_search_points.py",
    "tests/test_site_preflight.py::test_a_key_that_would_replace_submitits_own_flag_is_refused",
    "tests/test_site_preflight.py::test_an_additional_parameter_on_two_lines_is_refused",
    "tests/test_site_preflight.py::test_the_warning_signal_must_come_after_the_job_starts",
)
# Tests of those files that run the code under test in a subprocess (or hold one for seconds).
DESELECT = (
    "tests/test_cache_format.py::test_zip_bomb_under_a_memory_limit_gives_one_message",
    "tests/test_cache_prefetch.py::test_signal_during_download_cleans_up",
    "tests/test_cache_prefetch.py::test_odd_from_paths_give_one_message_and_write_nothing",
    "tests/test_rundir.py::test_status_and_report_go_on_past_damaged_files_with_notes",
    "tests/test_readers.py::test_a_decompression_bomb_is_refused_with_bounded_memory",
    "tests/test_readers.py::test_a_trial_whose_test_accuracy_cannot_be_is_a_note_never_ranked",
    "tests/test_readers.py::test_a_200_mb_metrics_file_is_refused_with_bounded_memory",
    "tests/test_report.py::test_report_imports_no_tensorflow",
    "tests/test_search_journal.py::test_waiters_that_all_find_a_dead_holder_never_hold_the_lock_together",
    "tests/test_search_journal.py::test_kill_9_mid_append_again_and_again_never_leaves_a_study_that_cannot_continue",
)
MARKERS = "not slurm and not slow"

# Mutants mutmut 3 cannot make (it mutates inside functions only): the four (the first is
# module-level, the others mutmut also makes in some form) and changes to the module-level
# constants that state a promise. Each is (name, file, text, replacement); ``hand`` applies each
# alone to the tree and runs the same tests, stopping at the first failure.
HAND_MUTANTS = (
    ("I11: train.batch_size no longer binds the run directory (nor the checkpoint)", "mnist_hpc/config.py",
     'multi_worker job).",\n        identity=True, traced=True, trajectory=True,',
     'multi_worker job).",\n        identity=False, traced=True, trajectory=False,'),
    ("I11: the label check >= NUM_CLASSES turned into >", "mnist_hpc/dataset.py",
     "if int(y.max()) >= NUM_CLASSES:", "if int(y.max()) > NUM_CLASSES:"),
    ("I11: every finished run shown COMPLETED, whatever sacct says", "mnist_hpc/rundir/state.py",
     'return "COMPLETED" if packed or scheduler_state in (None, "COMPLETED") else scheduler_state', 'return "COMPLETED"'),
    ("I11: ranked by final instead of best validation accuracy", "mnist_hpc/login/report/ranking.py",
     "return trial.best_val_accuracy", "return trial.val_accuracy"),
    ("train.distribution binds the run directory", "mnist_hpc/config.py",
     'float rounding.",\n        **_WHERE,', 'float rounding.",\n        identity=True, traced=False, trajectory=False,'),
    ("paths.output_root binds the run directory", "mnist_hpc/config.py",
     './outputs/mnist-hpc.",\n        **_WHERE,', './outputs/mnist-hpc.",\n        identity=True, traced=False, trajectory=False,'),
    ("TIMEOUT taken out of rundir.ENDED_STATES", "mnist_hpc/rundir/files.py", '"TIMEOUT", ', ""),
    ("NUM_CLASSES = 11", "mnist_hpc/dataset.py", "NUM_CLASSES = 10", "NUM_CLASSES = 11"),
    ("checkpoint.KEEP = 3", "mnist_hpc/compute/checkpoint.py", "KEEP = 2", "KEEP = 3"),
)

# mutmut's exit codes by what they mean for the score: a mutant is caught when a test failed on it
# (or it made the tests time out); anything else is a survivor to kill or explain.
CAUGHT = ("killed", "timeout")


def selection(work: Path) -> list[str]:
    """pytest's arguments that select the tests, for the tree in ``work``."""
    present = [t for t in TESTS if (work / t.split("::")[0]).is_file()]
    return [*present, "-m", MARKERS, *(f"--deselect={d}" for d in DESELECT)]


def configure(work: Path) -> None:
    """mutmut's config for the tree copied into ``work`` (read from its setup.cfg)."""
    lines = ["[mutmut]", "source_paths = mnist_hpc/"]

    def listed(key: str, values: list[str]) -> None:
        lines.append(f"{key} =")
        lines.extend(f"    {v}" for v in values)

    listed("only_mutate", list(modules()))
    # conf/ beside the package: mnist_hpc.config.conf_dir() finds it next to the mutated copy.
    listed("also_copy", ["conf/", "hydra_plugins/"])
    listed("pytest_add_cli_args_test_selection", selection(work))
    # Hypothesis draws the same examples in every run (the stats run, the clean run, each mutant's),
    # so a mutant is killed by what it changes, never by a new example.
    listed("pytest_add_cli_args", ["-p", "no:cacheprovider", "--hypothesis-seed=0"])
    lines.append("use_git_change_detection = false")
    (work / "setup.cfg").write_text("\n".join(lines) + "\n")


def _results(work: Path) -> list[dict[str, Any]]:
    """Every mutant of the mutated modules: its module, name, status and (unless caught) diff."""
    os.chdir(work)
    sys.path.insert(0, str(work))
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    out = []
    for module in modules():
        data = SourceFileMutationData(path=Path(module))
        data.load()
        for name, code in sorted(data.exit_code_by_key.items(), key=lambda kv: _natural(kv[0])):
            status = status_by_exit_code[code]
            row = {"module": module, "mutant": name, "status": status}
            if status not in CAUGHT:
                row["diff"] = "\n".join(get_diff_for_mutant(name, path=module).splitlines()[2:])
            out.append(row)
    return out


def _natural(name: str) -> tuple[str, int]:
    stem, _, number = name.rpartition("_")
    return stem, int(number) if number.isdigit() else 0


def report(work: Path, commit: str, json_path: Path | None) -> int:
    """Print the score per module and each survivor; write them as JSON when asked."""
    rows = _results(work)
    reasons: dict[str, dict[str, str]] = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.is_file() else {}
    modules = {}
    for module in modules():
        mine = [r for r in rows if r["module"] == module]
        counts = Counter(r["status"] for r in mine)
        caught = sum(counts[s] for s in CAUGHT)
        modules[module] = {"total": len(mine), "caught": caught, "statuses": dict(counts)}
    survivors = [r for r in rows if r["status"] not in CAUGHT]
    for r in survivors:
        if r["mutant"] in reasons:
            r.update(reasons[r["mutant"]])
    total = sum(m["total"] for m in modules.values())
    caught = sum(m["caught"] for m in modules.values())
    print(f"mutation score of {commit[:12]}: {caught} / {total} caught ({100 * caught / max(total, 1):.1f}%)")
    for module, m in modules.items():
        print(f"  {module:42s} {m['caught']:5d} / {m['total']:5d}  {m['statuses']}")
    unexplained = [r for r in survivors if "reason" not in r]
    print(f"{len(survivors)} not caught: {len(survivors) - len(unexplained)} explained "
          f"({dict(Counter(r.get('class', '?') for r in survivors if 'reason' in r))}), {len(unexplained)} without a reason")
    for r in unexplained:
        print(f"\n{r['mutant']} ({r['status']})\n{r['diff']}")
    if json_path is not None:
        result = {
            "commit": commit,
            "tool": "mutmut 3.8.1",
            "tests": selection(work),
            "score": {"caught": caught, "total": total},
            "modules": modules,
            "survivors": survivors,
        }
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    return 1 if unexplained else 0


def hand(work: Path) -> int:
    """Apply each of :data:`HAND_MUTANTS` alone to the tree in ``work`` and run the selected tests on it."""
    import subprocess

    survived = 0
    for name, module, text, replacement in HAND_MUTANTS:
        path = work / module
        original = path.read_text()
        assert original.count(text) == 1, f"{module} no longer holds {text!r} exactly once: update HAND_MUTANTS"
        path.write_text(original.replace(text, replacement))
        try:
            # The tree's own directory first on sys.path: the package is imported from it, mutated.
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0",
                                   *selection(work)], cwd=work, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(work)})
        finally:
            path.write_text(original)
        failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
        if proc.returncode == 1 and failed:
            print(f"killed    {name}: {failed[0].removeprefix('FAILED ')[:150]}")
        elif proc.returncode == 0:
            survived += 1
            print(f"SURVIVED  {name}")
        else:
            raise RuntimeError(f"pytest could not run on the mutant {name!r} (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    print(f"hand-made mutants: {len(HAND_MUTANTS) - survived} / {len(HAND_MUTANTS)} killed")
    return 1 if survived else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("configure").add_argument("work", type=Path)
    sub.add_parser("hand").add_argument("work", type=Path)
    rep = sub.add_parser("report")
    rep.add_argument("work", type=Path)
    rep.add_argument("--commit", default="")
    rep.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.command == "configure":
        configure(args.work)
        return 0
    if args.command == "hand":
        return hand(args.work.resolve())
    return report(args.work.resolve(), args.commit, args.json.resolve() if args.json else None)


if __name__ == "__main__":
    sys.exit(main())
