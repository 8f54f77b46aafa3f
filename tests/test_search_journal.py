"""The study's journal is never lost: torn last records are cut off (a copy kept), damage elsewhere
and trial directories the journal does not know are refused, a lock left by a killed holder on
this host is released at once, and kill -9 of a writer in the middle of an append, again and
again, always leaves a study that continues. Real Optuna storage, real processes, real SIGKILL.

As a module (``python -m tests.test_search_journal SEARCH_DIR MODE SEED``) it is the writer that
the kill tests kill: it loops ask -> report -> set_user_attr -> tell through the search's
storage; MODE ``tear`` makes it write part of a record under the lock and SIGKILL itself there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from mnist_hpc import claim
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


# --- read_journal's refusals, at their boundaries ------------------------------------------------------

CUT_SHORT = "cut short: it ends without a newline (a writer stopped in the middle of an append)"


def test_a_journal_of_exactly_its_cap_is_read_and_one_byte_over_is_refused_naming_the_cap(tmp_path, monkeypatch):
    search_dir, intact = make_study(tmp_path)
    journal = sd.journal_path(search_dir)
    monkeypatch.setattr(sd, "MAX_JOURNAL_BYTES", len(intact))
    assert len(sd.read_journal(journal).records) == intact.count(b"\n")
    monkeypatch.setattr(sd, "MAX_JOURNAL_BYTES", len(intact) - 1)
    with pytest.raises(sd.JournalError) as refused:
        sd.read_journal(journal)
    assert str(refused.value) == (f"{journal} is larger than {len(intact) - 1:,} bytes, more than twice what a study of "
                                  "10,000 trials of the lesson writes; the study cannot be read")


def test_a_journal_that_cannot_be_read_is_refused_naming_why(tmp_path):
    (tmp_path / "file").write_text("")
    inside_a_file = tmp_path / "file" / "study.journal"
    with pytest.raises(sd.JournalError) as refused:
        sd.read_journal(inside_a_file)
    assert str(refused.value) == f"{inside_a_file} is unreadable (Not a directory); the study cannot be read"
    directory = tmp_path / "study.journal"
    directory.mkdir()
    with pytest.raises(sd.JournalError) as refused:
        sd.read_journal(directory)
    assert str(refused.value) == f"{directory} is not a regular file; the study cannot be read"


def test_a_journal_cut_short_says_so_and_where(tmp_path):
    search_dir, intact = make_study(tmp_path)
    journal = sd.journal_path(search_dir)
    journal.write_bytes(intact + b'{"op_code": 1, "wor')
    scan = sd.read_journal(journal)
    assert (scan.end, scan.size, len(scan.records)) == (len(intact), len(intact) + 19, intact.count(b"\n"))
    assert scan.torn == CUT_SHORT


def test_a_record_optuna_cannot_apply_before_the_last_line_is_refused_naming_its_line(tmp_path):
    """Whole JSON in the shape of a record, which Optuna's replay rejects (a direction it has no
    member for): only the last line may be such, and not even that one when a torn line follows it."""
    search_dir, intact = make_study(tmp_path)
    journal = sd.journal_path(search_dir)
    bad = json.dumps({"op_code": 0, "worker_id": "w", "study_name": "t", "directions": [99]}).encode() + b"\n"
    lines = intact.splitlines(keepends=True)
    for damaged, line in ((b"".join(lines[:-1]) + bad + lines[-1], len(lines)),
                          (intact + bad + b'{"op_code": 1, "wor', len(lines) + 1)):
        journal.write_bytes(damaged)
        with pytest.raises(sd.JournalError) as refused:
            sd.read_journal(journal)
        assert str(refused.value).startswith(
            f"line {line} of {journal} is damaged (a record Optuna cannot apply (ValueError: 99 is not a valid StudyDirection)), "
            "and it is not the last line")



def test_the_last_line_of_the_shortest_files_is_found(tmp_path):
    path = tmp_path / "study.journal"
    for content, torn in ((b"x", (0, CUT_SHORT)), (b"\nx", (1, CUT_SHORT)),
                          (b"\n", (0, "no record Optuna wrote: it is not JSON (Expecting value at character 0)"))):
        path.write_bytes(content)
        assert sd.torn_tail(path) == torn


def test_a_journal_line_at_the_edges_of_its_size_and_depth_caps(tmp_path, monkeypatch):
    def record(depth: int) -> bytes:  # the record and its user_attr are two levels
        nested = json.loads("[" * (depth - 2) + "]" * (depth - 2))
        return json.dumps({"op_code": 8, "worker_id": "w", "trial_id": 0, "user_attr": {"k": nested}}).encode()

    assert sd._parse_record(record(16)) == (json.loads(record(16)), None)
    assert sd._parse_record(record(17)) == (None, "it nests too deeply")
    assert sd._parse_record(b"[" * 100_000 + b"]" * 100_000) == (None, "it nests too deeply")  # past Python's recursion limit
    line, first = record(3), record(4) + b"\n"
    path = tmp_path / "study.journal"
    monkeypatch.setattr(sd, "MAX_RECORD_BYTES", len(line))
    assert sd._parse_record(line)[1] is None
    for before in (b"", first):  # the last line is the only one, or follows another
        path.write_bytes(before + line + b"\n")
        assert sd.torn_tail(path) is None
    monkeypatch.setattr(sd, "MAX_RECORD_BYTES", len(line) - 1)
    longer = f"it is longer than {len(line) - 1:,} bytes"
    assert sd._parse_record(line) == (None, longer)
    for before in (b"", first):
        path.write_bytes(before + line + b"\n")
        assert sd.torn_tail(path) == (len(before), f"no record Optuna wrote: {longer}")


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


# --- HolderLock's steps in this process, on a fake clock ------------------------------------------
# The tests above race real processes, whose interpreters import the package afresh: mutation
# testing (scripts/mutation.sh) cannot see them. These drive each step of the lock in this process,
# with search.py's clock replaced, so that every decision (when to wait, warn, break, give up a
# lock) is asserted against the time it was made at.

HERE = socket.gethostname()


def holder_text(host: str = HERE, pid: int = 2**31 - 1, start: object = None, token: str = "t") -> str:
    """A lock's text as HolderLock writes it; by default a process of this host that has ended
    (2**31 - 1 is a valid process id that no process has: pid_max is at most 2**22)."""
    return sd._LOCK_PREFIX + json.dumps({"host": host, "pid": pid, "start": start, "token": token})


OTHER_NODE = holder_text(host="some-other-node", pid=1, start="1", token="other")  # cannot be asked: grace period only
DEAD_HERE = holder_text(token="dead")
INIT_START = claim.process_start(1)  # process 1 lives as long as the machine: a holder here that is alive


class FakeClock:
    """search.py's ``time``: ``monotonic()`` reads it; ``sleep()`` records the delay asked and moves
    it on by that delay (or by a fixed ``tick``), then calls ``on_sleep`` (a change made while the
    waiter sleeps)."""

    def __init__(self, tick: float | None = None) -> None:
        self.now, self.tick, self.sleeps = 1000.0, tick, []
        self.on_sleep: Callable[[], None] = lambda: None

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        assert len(self.sleeps) < 10_000, "still waiting after 10,000 sleeps (a lock never released?)"
        self.now += seconds if self.tick is None else self.tick
        self.on_sleep()


class Said(logging.Handler):
    """search.py's warnings, each with the fake time it was said at."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(logging.WARNING)
        self.clock, self.lines = clock, []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((self.clock.now, record.getMessage()))


@pytest.fixture
def clock(monkeypatch) -> Iterator[tuple[FakeClock, Said]]:
    fake = FakeClock()
    monkeypatch.setattr(sd, "time", SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep,
                                                    strftime=time.strftime, gmtime=time.gmtime))
    said = Said(fake)
    logger = logging.getLogger(sd.__name__)
    logger.addHandler(said)
    try:
        yield fake, said
    finally:
        logger.removeHandler(said)


def shown(text: str) -> str:
    """How messages show a lock's holder."""
    return text.removeprefix(sd._LOCK_PREFIX)


def test_a_lock_text_names_this_process_and_a_token_of_its_own():
    first, second = sd.HolderLock._new_text(), sd.HolderLock._new_text()
    assert first.startswith(sd._LOCK_PREFIX) and first != second
    data = json.loads(first.removeprefix(sd._LOCK_PREFIX))
    assert set(data) == {"host", "pid", "start", "token"} and re.fullmatch(r"[0-9a-f]{32}", data["token"])
    assert (data["host"], data["pid"], data["start"]) == (HERE, os.getpid(), claim.process_start(os.getpid()))
    assert sd._holder_is_gone(first) is False


def test_a_free_lock_is_taken_at_once_and_released_only_by_its_holder(tmp_path, clock):
    fake, said = clock
    path = tmp_path / "x.lock"
    lock = sd.HolderLock(path)
    assert lock.grace_s == sd.LOCK_GRACE_S and sd.HolderLock(path, grace_s=0.5).grace_s == 0.5
    journal_lock = sd.JournalLock(tmp_path / "study.journal")  # Optuna's protocol: acquire() returns True
    assert journal_lock.acquire() is True and os.readlink(journal_lock.path) == journal_lock._text
    journal_lock.release()
    assert lock.acquire() is True
    assert os.readlink(path) == lock._text and sd._holder_is_gone(lock._text) is False
    lock.release()
    assert not os.path.lexists(path) and lock._text is None and said.lines == [] and fake.sleeps == []
    os.symlink(OTHER_NODE, path)  # another waiter took it since
    lock.release()  # a second release leaves the new holder's lock alone
    assert os.readlink(path) == OTHER_NODE
    assert said.lines == [(fake.now, f"{path} was taken over while held (this process stalled for over 30 s?)")]


def test_a_lock_taken_over_while_held_is_left_to_its_new_holder(tmp_path, clock, monkeypatch):
    fake, said = clock
    path = tmp_path / "x.lock"
    lock = sd.HolderLock(path, grace_s=7.4)
    lock.acquire()
    os.unlink(path)
    os.symlink(OTHER_NODE, path)
    lock.release()
    assert os.readlink(path) == OTHER_NODE
    os.unlink(path)
    lock.acquire()
    os.unlink(path)  # broken and released by another waiter while this one stalled
    lock.release()
    assert not os.path.lexists(path)
    taken = f"{path} was taken over while held (this process stalled for over 7 s?)"
    assert said.lines == [(fake.now, taken)] * 2
    # Taken over between the release's look and its unlink: nothing left to remove, and no error.
    lock.acquire()
    readlink = os.readlink

    def look_then_lose(p):
        text = readlink(p)
        os.unlink(p)
        return text

    monkeypatch.setattr(os, "readlink", look_then_lose)
    lock.release()
    assert not os.path.lexists(path) and len(said.lines) == 2


def test_a_waiter_backs_off_to_50_ms_and_breaks_an_unaskable_holder_only_after_the_grace_period(tmp_path, clock, monkeypatch):
    fake, said = clock
    path = tmp_path / "x.lock"
    os.symlink(OTHER_NODE, path)
    lock, start = sd.HolderLock(path), fake.now
    next_holder = holder_text(host="a-third-node", pid=2, start="2", token="next")
    breaks = []

    def break_then_lose_the_race(stale: str, why: str) -> None:  # another waiter links right after the break
        sd.HolderLock._break(lock, stale, why)
        breaks.append(fake.now)
        if len(breaks) == 1:
            os.symlink(next_holder, path)

    monkeypatch.setattr(lock, "_break", break_then_lose_the_race)
    lock.acquire()
    assert os.readlink(path) == lock._text and not os.path.lexists(f"{path}.break")
    first = breaks[0] - start
    assert 30 < first <= 30.05 + 1e-9 and 30 < breaks[1] - breaks[0] <= 30.05 + 1e-9
    backoff = [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.05]
    before = fake.sleeps[: fake.sleeps.index(0.001, 1)]
    assert before[:7] == backoff and set(before[7:]) == {0.05}
    assert fake.sleeps[len(before):][:7] == backoff  # the backoff starts again for the next holder
    # A warning for each 10 s of waiting, whoever holds the lock meanwhile.
    waiting = [(t - start, line) for t, line in said.lines if line.startswith("waiting")]
    assert round(waiting[0][0], 3) == 10.013 and all(10 < b[0] - a[0] <= 10.05 + 1e-9 for a, b in zip(waiting, waiting[1:]))
    assert [line for _, line in waiting] == [f"waiting for {path}, held by {shown(OTHER_NODE)}"] * 2 + [
        f"waiting for {path}, held by {shown(next_holder)}"] * 3
    assert [line for _, line in said.lines if not line.startswith("waiting")] == [
        f"released {path}: it has been held unchanged for over 30 s ({shown(OTHER_NODE)})",
        f"released {path}: it has been held unchanged for over 30 s ({shown(next_holder)})"]


def test_a_waiter_warns_every_10_s_and_breaks_just_past_the_grace_period(tmp_path, clock):
    fake, said = clock
    fake.tick = 1.0  # each sleep takes 1 s: the times of the decisions are whole seconds
    path = tmp_path / "x.lock"
    os.symlink(OTHER_NODE, path)
    start = fake.now
    sd.HolderLock(path, grace_s=11.0).acquire()
    assert [(t - start, line) for t, line in said.lines] == [
        (11.0, f"waiting for {path}, held by {shown(OTHER_NODE)}"),
        (12.0, f"released {path}: it has been held unchanged for over 11 s ({shown(OTHER_NODE)})")]


def test_the_grace_period_restarts_when_the_lock_changes_hands(tmp_path, clock):
    fake, said = clock
    path = tmp_path / "x.lock"
    os.symlink(OTHER_NODE, path)
    start, changed = fake.now, []
    second = holder_text(host="a-third-node", pid=2, start="2", token="second")

    def hand_over() -> None:
        if not changed and fake.now - start > 0.6:
            os.unlink(path)
            os.symlink(second, path)
            changed.append(fake.now)

    fake.on_sleep = hand_over
    sd.HolderLock(path, grace_s=1.0).acquire()
    assert said.lines[-1][1] == f"released {path}: it has been held unchanged for over 1 s ({shown(second)})"
    assert 1.0 < said.lines[-1][0] - changed[0] <= 1.05 + 1e-9


def test_a_dead_holders_lock_is_broken_at_once_and_the_backoff_starts_again(tmp_path, clock, monkeypatch):
    fake, said = clock
    path = tmp_path / "x.lock"
    os.symlink(DEAD_HERE, path)
    lock = sd.HolderLock(path)
    lock.acquire()
    assert fake.sleeps == [] and os.readlink(path) == lock._text
    assert said.lines == [(fake.now, f"released {path}: its holder is gone ({shown(DEAD_HERE)})")]
    lock.release()
    # Held by a live process here, which dies after five sleeps; another waiter wins the race after the break.
    alive_here = holder_text(pid=1, start=INIT_START, token="alive")
    assert sd._holder_is_gone(alive_here) is False
    os.symlink(alive_here, path)

    def dies() -> None:
        if len(fake.sleeps) == 5:
            os.unlink(path)
            os.symlink(DEAD_HERE, path)

    def break_then_lose_the_race(stale: str, why: str) -> None:
        sd.HolderLock._break(lock, stale, why)
        if stale == DEAD_HERE:
            os.symlink(OTHER_NODE, path)

    fake.on_sleep = dies
    monkeypatch.setattr(lock, "_break", break_then_lose_the_race)
    lock.acquire()
    assert fake.sleeps[:7] == [0.001, 0.002, 0.004, 0.008, 0.016, 0.001, 0.002]
    assert os.readlink(path) == lock._text


def test_the_break_lock_is_freed_only_after_the_grace_period_whoever_held_it(tmp_path, clock):
    """The break lock is held for microseconds: a holder that died inside it is not asked about, and
    its lock is removed without a break lock of its own."""
    fake, said = clock
    path = tmp_path / "x.lock"
    breaker = f"{path}.break"
    lock = sd.HolderLock(path, grace_s=2.0)
    for holder in (DEAD_HERE, OTHER_NODE):
        os.symlink(holder, breaker)
        start, mine = fake.now, lock._new_text()
        lock._wait_and_link(breaker, mine, may_break_dead=False)
        assert os.readlink(breaker) == mine and 2.0 < fake.now - start <= 2.05 + 1e-9
        assert not os.path.lexists(f"{breaker}.break") and not any(line.startswith("released") for _, line in said.lines)
        os.unlink(breaker)


def test_a_break_removes_only_the_lock_it_judged_and_then_its_own_break_lock(tmp_path, clock):
    fake, said = clock
    path = tmp_path / "x.lock"
    breaker = f"{path}.break"
    lock = sd.HolderLock(path, grace_s=2.0)
    os.symlink(OTHER_NODE, path)
    lock._break(DEAD_HERE, "its holder is gone")  # it changed hands since it was judged: kept
    assert os.readlink(path) == OTHER_NODE and not os.path.lexists(breaker) and said.lines == []
    lock._break(OTHER_NODE, "why")
    assert not os.path.lexists(path) and not os.path.lexists(breaker) and fake.sleeps == []
    assert said.lines == [(fake.now, f"released {path}: why ({shown(OTHER_NODE)})")]
    # A break lock left by a breaker that died: this break waits out its grace period, then goes on.
    os.symlink(DEAD_HERE, path)
    os.symlink(DEAD_HERE, breaker)
    start = fake.now
    lock._break(DEAD_HERE, "its holder is gone")
    assert 2.0 < fake.now - start <= 2.05 + 1e-9
    assert not os.path.lexists(path) and not os.path.lexists(breaker) and not os.path.lexists(f"{breaker}.break")


def test_a_lock_released_between_two_looks_is_taken_without_waiting(tmp_path, clock, monkeypatch):
    fake, _ = clock
    path = tmp_path / "x.lock"
    os.symlink(OTHER_NODE, path)
    lock_identity = sd._lock_identity

    def released_meanwhile(p: str):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
        return lock_identity(p)

    monkeypatch.setattr(sd, "_lock_identity", released_meanwhile)
    lock = sd.HolderLock(path)
    lock.acquire()
    assert os.readlink(path) == lock._text and fake.sleeps == []


def test_a_link_that_names_a_directory_is_a_lock_a_directory_is_not(tmp_path, clock):
    fake, said = clock
    path = tmp_path / "x.lock"
    os.symlink(tmp_path, path)  # a link whose text happens to name a directory
    lock = sd.HolderLock(path, grace_s=1.0)
    lock.acquire()
    assert os.readlink(path) == lock._text and said.lines[-1][1].startswith(f"released {path}: it has been held unchanged")
    lock.release()
    path.mkdir()
    with pytest.raises(sd.SearchFileError, match=f"^{re.escape(str(path))} is a directory, not a lock file; remove it"):
        lock.acquire()
    # Nor does a waiter that judged it a lock remove it.
    assert sd._unlink_if(str(path), sd._lock_identity(str(path))) is False and path.is_dir()


@pytest.mark.parametrize("text, gone", [
    (DEAD_HERE, True),
    (holder_text(pid=1, start="0"), True),  # process 1 has another start time: the holder's pid was reused
    (holder_text(pid=1, start=INIT_START), False),  # alive
    (holder_text(pid=1, start=None), False),  # alive (no start time to tell a reused pid)
    (sd._LOCK_PREFIX + json.dumps({"host": HERE, "pid": 2**31 - 1}), True),  # written without a start
    (holder_text(host="some-other-node"), False),  # cannot be asked
    (holder_text(pid=os.getpid(), start=claim.process_start(os.getpid())), False),  # this process (another thread)
    (holder_text(pid=True, start="0"), False),  # a JSON true is no process id
    (holder_text(pid=2**31), False),
    (holder_text(pid=0), False),
    (holder_text(start=5), False),  # not a start time this module writes
    (holder_text(host=5), False),
    (DEAD_HERE.removeprefix(sd._LOCK_PREFIX), False),  # no lock of ours: only the grace period frees it
    (sd._LOCK_PREFIX + "not json", False),
    (sd._LOCK_PREFIX + json.dumps([HERE, 2**31 - 1]), False),
    (sd._LOCK_PREFIX + json.dumps({"pid": 2**31 - 1}), False),
    (sd._LOCK_PREFIX + json.dumps({"host": HERE}), False),
])
def test_a_lock_holder_is_gone_only_when_it_names_a_process_of_this_host_that_ended(text, gone):
    assert sd._holder_is_gone(text) is gone


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
