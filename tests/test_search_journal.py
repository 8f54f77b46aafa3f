"""The study's journal is never lost: torn last records are cut off (a copy kept), damage elsewhere
and trial directories the journal does not know are refused, a lock left by a killed holder on
this host is released at once, and kill -9 of a writer in the middle of an append, again and
again, always leaves a study that continues. Real Optuna storage, real processes, real SIGKILL.

As a module (``python -m tests.test_search_journal SEARCH_DIR MODE SEED``) it is the writer that
the kill tests kill: it loops ask -> report -> set_user_attr -> tell through the search's
storage; MODE ``tear`` makes it write part of a record under the lock and SIGKILL itself there.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from mnist_hpc import search as sd
from tests.helpers import REPO

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = {"x": FloatDistribution(0.0, 1.0)}
CHILD = [sys.executable, "-m", "tests.test_search_journal"]


def make_study(tmp_path: Path, trials: int = 3) -> tuple[Path, bytes]:
    """A search directory whose journal holds a study "s" with ``trials`` complete trials; its bytes."""
    search_dir = tmp_path / "search"
    search_dir.mkdir()
    study = optuna.create_study(storage=sd.open_storage(search_dir), study_name="s", direction="maximize")
    for i in range(trials):
        trial = study.ask(SPACE)
        trial.report(0.5, 1)
        study.tell(trial, 0.5 + i / 100)
    return search_dir, sd.journal_path(search_dir).read_bytes()


def continue_study(search_dir: Path) -> list[optuna.trial.FrozenTrial]:
    """What a worker does next: load the study, ask, report, tell; the trials after it."""
    study = optuna.load_study(study_name="s", storage=sd.open_storage(search_dir))
    before = len(study.trials)
    trial = study.ask(SPACE)
    trial.report(0.6, 1)
    study.tell(trial, 0.9)
    trials = optuna.load_study(study_name="s", storage=sd.open_storage(search_dir)).trials
    assert len(trials) == before + 1 and trials[-1].state == TrialState.COMPLETE and trials[-1].value == 0.9
    return trials


def lock_path(search_dir: Path) -> Path:
    return Path(str(sd.journal_path(search_dir)) + sd.JOURNAL_LOCK_SUFFIX)


def within(seconds: float, call: Callable[[], object]) -> object:
    """``call()`` in a thread; fails if it has not returned within ``seconds`` (a lock it waits on forever)."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = call()
        except BaseException as exc:  # re-raised in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s (a lock that was not released?)"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


# --- Optuna's side of the plugin point --------------------------------------------------------------


def test_optuna_appends_only_under_our_lock_and_releases_it(tmp_path, monkeypatch):
    """What the journal relies on: JournalFileBackend takes the lock it is given around each append."""
    search_dir, _ = make_study(tmp_path, trials=0)
    journal = sd.journal_path(search_dir)
    events: list[tuple[str, int]] = []
    acquire, release = sd.JournalLock.acquire, sd.JournalLock.release

    def counting_acquire(self):
        result = acquire(self)
        events.append(("acquire", journal.stat().st_size))
        assert os.readlink(self.path).startswith("mnist-hpc-lock:")  # the holder is named in the link
        return result

    def counting_release(self):
        events.append(("release", journal.stat().st_size))
        release(self)

    monkeypatch.setattr(sd.JournalLock, "acquire", counting_acquire)
    monkeypatch.setattr(sd.JournalLock, "release", counting_release)
    lines = journal.read_bytes().count(b"\n")
    continue_study(search_dir)
    added = journal.read_bytes().count(b"\n") - lines
    assert [e[0] for e in events] == ["acquire", "release"] * added
    # Each append happened between its acquire and its release.
    assert all(a[1] < r[1] for a, r in zip(events[::2], events[1::2]))
    assert not os.path.lexists(lock_path(search_dir))


# --- torn last records --------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage_line", "cut_40_bytes", "valid_json_not_a_record", "no_newline_at_end"])
def test_a_torn_last_record_is_cut_off_with_a_copy_and_the_study_continues(tmp_path, damage):
    """The issue's reproductions: ``echo 'not json {{{' >> study.journal`` and ``truncate -s -40 study.journal``."""
    search_dir, intact = make_study(tmp_path)
    journal = sd.journal_path(search_dir)
    last_start = intact.rstrip(b"\n").rfind(b"\n") + 1
    damaged, kept = {
        "garbage_line": (intact + b"not json {{{\n", intact),
        "cut_40_bytes": (intact[:-40], intact[:last_start]),
        "valid_json_not_a_record": (intact + b'{"op_code": 4, "worker_id": "w"}\n', intact),
        "no_newline_at_end": (intact[:-1], intact[:last_start]),
    }[damage]
    journal.write_bytes(damaged)

    scan = sd.read_journal(journal)
    assert scan is not None and scan.torn is not None and scan.end == len(kept)
    check = sd.check_journal(search_dir, "s")
    assert journal.read_bytes() == kept
    assert check.cut is not None and check.cut.copy.read_bytes() == damaged and check.cut.end == len(kept)
    assert check.cut.copy.parent == search_dir and check.cut.copy.name.startswith("study.journal.torn-")
    assert str(check.cut.copy) in (check.note() or "")
    trials = continue_study(search_dir)
    assert [t.value for t in trials[:2]] == [0.5, 0.51]  # the complete records before the torn one


def test_an_append_after_a_torn_record_cuts_it_first(tmp_path):
    """A live worker that never ran check_journal: its next append does the repair (JournalLock)."""
    search_dir, intact = make_study(tmp_path)
    journal = sd.journal_path(search_dir)
    live = optuna.load_study(study_name="s", storage=sd.open_storage(search_dir))  # opened before the damage
    journal.write_bytes(intact + b'{"op_code": 6, "trial_id": 0, "st')  # a writer killed mid-append
    trial = live.ask(SPACE)
    live.tell(trial, 0.8)
    assert journal.read_bytes().startswith(intact)
    assert sd.read_journal(journal).torn is None
    [copy] = search_dir.glob("study.journal.torn-*")
    assert copy.read_bytes().endswith(b'"st')
    assert [t.value for t in optuna.load_study(study_name="s", storage=sd.open_storage(search_dir)).trials][-1] == 0.8


def test_a_live_writers_append_in_progress_is_never_cut(tmp_path, monkeypatch):
    """check_journal reads while a writer holds the lock with half its record written: it finds the
    line torn, but decides under the lock, after the writer finished, and cuts nothing."""
    monkeypatch.setattr(sd, "LOCK_GRACE_S", 3600.0)
    search_dir, intact = make_study(tmp_path)
    journal = sd.journal_path(search_dir)
    record = intact.splitlines(keepends=True)[-1]
    writer = sd.JournalLock(journal)
    writer.acquire()
    with open(journal, "ab") as fh:
        fh.write(record[:20])
    waiting = threading.Event()
    wait_and_link = sd.HolderLock._wait_and_link

    def observed(self, path, text, may_break_dead):
        if path == str(lock_path(search_dir)):
            waiting.set()  # the check has read the journal and now waits for the lock
        return wait_and_link(self, path, text, may_break_dead)

    monkeypatch.setattr(sd.HolderLock, "_wait_and_link", observed)
    result: dict = {}
    checker = threading.Thread(target=lambda: result.update(check=sd.check_journal(search_dir, "s")))
    checker.start()
    assert waiting.wait(60)
    with open(journal, "ab") as fh:
        fh.write(record[20:])
    writer.release()
    checker.join(60)
    assert not checker.is_alive() and result["check"].cut is None
    assert result["check"].scan.torn is not None  # what it read was torn at the time
    assert journal.read_bytes() == intact + record and not list(search_dir.glob("study.journal.torn-*"))


# --- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["first", "middle", "before_last"])
def test_damage_before_the_last_line_is_refused_naming_the_line(tmp_path, where):
    search_dir, intact = make_study(tmp_path)
    journal = sd.journal_path(search_dir)
    lines = intact.splitlines(keepends=True)
    index = {"first": 0, "middle": len(lines) // 2, "before_last": len(lines) - 2}[where]
    lines[index] = b'{"op_code": 5, "worker_id": "w", "trial_id": 0, "param_name": "x"}\n' if where == "middle" else b"garbage\n"
    journal.write_bytes(b"".join(lines))
    with pytest.raises(sd.JournalError, match=rf"line {index + 1} of .*study.journal is damaged") as refused:
        sd.check_journal(search_dir, "s")
    assert "not the last line" in str(refused.value) and "new hydra.sweep.dir" in str(refused.value)
    assert journal.read_bytes() == b"".join(lines)  # nothing was cut or rewritten
    assert not list(search_dir.glob("study.journal.torn-*"))


@pytest.mark.parametrize("journal_state", ["missing", "empty", "truncated_to_fewer_trials", "another_study", "only_torn"])
def test_trial_directories_the_journal_does_not_know_are_refused(tmp_path, journal_state):
    search_dir, intact = make_study(tmp_path, trials=6)
    for n in range(6):
        (search_dir / str(n)).mkdir()
    journal = sd.journal_path(search_dir)
    if journal_state == "missing":
        journal.unlink()
    elif journal_state == "empty":
        journal.write_bytes(b"")
    elif journal_state == "truncated_to_fewer_trials":  # a cut at a line end: no torn record
        lines = intact.splitlines(keepends=True)
        journal.write_bytes(b"".join(lines[: len(lines) // 2]))
    elif journal_state == "only_torn":
        journal.write_bytes(intact[:30])
    before = journal.read_bytes() if journal.exists() else None
    name = "other" if journal_state == "another_study" else "s"
    with pytest.raises(sd.JournalError) as refused:
        sd.check_journal(search_dir, name)
    message = str(refused.value)
    orphans = "0-5" if journal_state != "truncated_to_fewer_trials" else ""
    assert f"directories of trials {orphans}" in message and "a new one would collide" in message
    assert "mnist-hpc-status" in message
    assert (journal.read_bytes() if journal.exists() else None) == before  # refused before any repair


def test_a_journal_over_its_cap_is_refused_by_its_size_without_reading_it(tmp_path):
    search_dir, _ = make_study(tmp_path)
    journal = sd.journal_path(search_dir)
    os.truncate(journal, sd.MAX_JOURNAL_BYTES + 1)  # sparse: nothing to read, all of it too large
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(sd.JournalError, match="is larger than 67,108,864 bytes"):
        sd.read_journal(journal)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_the_journal_cap_holds_a_ten_thousand_trial_study():
    """The cap against a measured study: 10,000 trials of the lesson (5 epochs, 4 parameters, the
    workers' attributes) write 2,263 bytes each (22.6 MB); the cap must hold them with room (more
    than twice as many), and not a hundred times as many."""
    per_trial = 2263
    assert 10_000 * per_trial * 2.5 < sd.MAX_JOURNAL_BYTES < 10_000 * per_trial * 100


# --- the lock ---------------------------------------------------------------------------------------


HOLD = (
    "import sys, time; from pathlib import Path; from mnist_hpc import search as sd\n"
    "lock = sd.HolderLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(600)\n"
)


def hold_lock_in_child(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_whose_holder_was_killed_on_this_host_is_released_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, "LOCK_GRACE_S", 3600.0)  # only the holder's death may release it
    path = tmp_path / "x.lock"
    holder = hold_lock_in_child(path)
    text = os.readlink(path)
    assert not sd._holder_is_gone(text)  # alive: kept
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert sd._holder_is_gone(text)
    lock = sd.HolderLock(path)
    within(30, lock.acquire)
    assert os.readlink(path) != text and not os.path.lexists(str(path) + ".break")
    lock.release()
    assert not os.path.lexists(path)


def test_a_holder_that_cannot_be_asked_is_released_only_after_the_grace_period(tmp_path):
    path = tmp_path / "x.lock"
    other_host = sd._LOCK_PREFIX + json.dumps({"host": "some-other-node", "pid": 1, "start": "1", "token": "t"})
    optunas_own = str(tmp_path / "study.journal")  # what Optuna's JournalFileSymlinkLock's link points to
    for text in (other_host, optunas_own, None):
        if text is None:  # a plain file, as Optuna's JournalFileOpenLock makes
            path.write_bytes(b"")
        else:
            assert not sd._holder_is_gone(text)
            os.symlink(text, path)
        lock = sd.HolderLock(path, grace_s=0.2)
        within(30, lock.acquire)  # after 0.2 s of seeing it unchanged
        assert os.readlink(path).startswith(sd._LOCK_PREFIX)
        lock.release()
        assert not os.path.lexists(path)


def test_a_directory_in_place_of_the_lock_is_refused_naming_it(tmp_path):
    search_dir, intact = make_study(tmp_path)
    lock_path(search_dir).mkdir()
    with pytest.raises(sd.SearchFileError, match=r"study.journal.lock is a directory, not a lock file; remove it"):
        within(30, lambda: sd.check_journal(search_dir, "s"))
    assert sd.journal_path(search_dir).read_bytes() == intact


COUNT = (
    "import sys; from pathlib import Path; from mnist_hpc import search as sd\n"
    "lock, counter = sd.HolderLock(Path(sys.argv[1])), Path(sys.argv[2])\n"
    "for _ in range(40):\n"
    "    with sd.held(lock):\n"
    "        n = int(counter.read_text()); counter.write_text(str(n + 1))\n"
)


def test_waiters_that_all_find_a_dead_holder_never_hold_the_lock_together(tmp_path):
    """Four processes find one killed holder's lock at once and break it: every increment counts."""
    path, counter = tmp_path / "x.lock", tmp_path / "counter"
    counter.write_text("0")
    holder = hold_lock_in_child(path)
    workers = [subprocess.Popen([sys.executable, "-c", COUNT, str(path), str(counter)], cwd=REPO) for _ in range(4)]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert [w.wait(timeout=120) for w in workers] == [0, 0, 0, 0]
    assert counter.read_text() == "160"


# --- kill -9 in a loop ------------------------------------------------------------------------------


def child(search_dir: Path, mode: str, seed: int) -> None:
    """The writer the kill test kills (see the module docstring)."""
    rng = random.Random(seed)
    study = optuna.load_study(study_name="s", storage=sd.open_storage(search_dir), sampler=optuna.samplers.RandomSampler(seed))
    if mode == "tear":
        appends_left = rng.randrange(1, 12)
        append = optuna.storages.journal.JournalFileBackend.append_logs

        def tearing(self, logs):  # the n-th append: part of its record under the lock, then SIGKILL
            nonlocal appends_left
            appends_left -= 1
            if appends_left:
                return append(self, logs)
            sd.JournalLock(sd.journal_path(search_dir)).acquire()
            data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode()
            with open(sd.journal_path(search_dir), "ab") as fh:
                fh.write(data[: rng.randrange(0, len(data))])
                fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        optuna.storages.journal.JournalFileBackend.append_logs = tearing  # type: ignore[method-assign]
    print("ready", flush=True)
    while True:
        trial = study.ask(SPACE)
        trial.report(0.5, 1)
        trial.set_user_attr(sd.WORKER_ATTR, f"child-{seed}")
        study.tell(trial, 0.5)


@pytest.mark.slow
def test_kill_9_mid_append_again_and_again_never_leaves_a_study_that_cannot_continue(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, "LOCK_GRACE_S", 3600.0)  # a killed holder's lock must go at once, not by time
    seed = int(os.environ.get("KILL_LOOP_SEED", "20240607"))
    rng = random.Random(seed)
    search_dir, _ = make_study(tmp_path, trials=1)
    journal = sd.journal_path(search_dir)
    outcomes = {"torn": 0, "whole": 0, "lock_left": 0}
    for i in range(36):
        mode = ("kill", "tear", "truncate")[i % 3]
        if mode == "truncate":
            size = journal.stat().st_size
            os.truncate(journal, rng.randrange(size // 2, size))
        else:
            proc = subprocess.Popen([*CHILD, str(search_dir), mode, str(rng.randrange(1 << 30))], cwd=REPO,
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", f"iteration {i}: child failed"
            if mode == "kill":
                threading.Event().wait(rng.uniform(0.0, 0.3))  # a random point in its loop of appends
                proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=120) == -signal.SIGKILL
        before = journal.read_bytes()
        outcomes["lock_left"] += os.path.lexists(lock_path(search_dir))
        complete = before[: before.rfind(b"\n") + 1]  # every record that was written whole
        outcomes["torn" if complete != before else "whole"] += 1
        if i % 2:  # the submission's and a new worker's path: check_journal first
            check = within(60, lambda: sd.check_journal(search_dir, "s"))
            assert journal.read_bytes() == complete, f"iteration {i} ({mode}, seed {seed})"
            assert (check.cut.copy.read_bytes() if check.cut else before) == before  # type: ignore[union-attr]
            assert (check.cut is None) == (complete == before)
            within(60, lambda: continue_study(search_dir))
        else:  # a live worker's path: its next append repairs
            within(60, lambda: continue_study(search_dir))
            assert journal.read_bytes().startswith(complete), f"iteration {i} ({mode}, seed {seed})"
        assert sd.read_journal(journal).torn is None and not os.path.lexists(lock_path(search_dir))
    copies = list(search_dir.glob("study.journal.torn-*"))
    assert len(copies) == outcomes["torn"]
    # The loop must have exercised both outcomes and a lock left behind by a killed holder.
    assert outcomes["torn"] >= 12 and outcomes["whole"] >= 1 and outcomes["lock_left"] >= 12, outcomes


if __name__ == "__main__":
    child(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
