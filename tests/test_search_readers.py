"""Property tests of the readers of files other processes write in a search directory (search.json,
the workers' heartbeats, the journal, the lock's link): whatever the bytes, a value in range or a
note naming the file, never another exception, and nothing read beyond a cap that fits the file."""

from __future__ import annotations

import json
import math
import os
import tempfile
import tracemalloc
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution, FloatDistribution

from mnist_hpc import search as sd
from mnist_hpc.login import study as status

optuna.logging.set_verbosity(optuna.logging.WARNING)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def good_spec() -> dict:
    return {"study_name": "s", "direction": "maximize", "n_trials": 4, "params": {"optimizer.learning_rate": "interval(0.001,0.01)"},
            "fixed": [], "enqueue": [], "sampler": {"_target_": "optuna.samplers.RandomSampler"}, "pruner": None,
            "heartbeat_s": 1.0, "stale_after_s": 30.0, "workers": 2, "identity": {"data.sha256": "a" * 64}}


def good_beat() -> dict:
    return {"job_id": "123_0", "cluster": "slurm", "host": "n1", "pid": 42, "pid_start": "99", "trial": 3,
            "state": "running", "trials_run": [0, 1], "message": "", "log": "/x.out"}


def mutated(good: dict) -> st.SearchStrategy[dict]:
    """The good object with some of its fields replaced by any JSON value, or dropped."""
    keys = sorted(good)
    # Values near the edges of the ranges (0, negative, fractions, empty strings) as well as any JSON.
    edges = st.integers(-2, 2) | st.floats(-1.0, 1.0) | st.sampled_from(["", "x", [], {}, [-1], [1.5]])
    return st.dictionaries(st.sampled_from(keys), JSON | edges | st.just("__drop__"), max_size=3).map(
        lambda changes: {k: changes.get(k, v) for k, v in good.items() if changes.get(k) != "__drop__"}
    )


def file_bytes(good: dict) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=300),
        mutated(good).map(lambda d: json.dumps(d).encode()),
        JSON.map(lambda v: json.dumps(v).encode()),
        st.builds(lambda d, cut: json.dumps(d).encode()[:cut], mutated(good), st.integers(0, 200)),
    )


def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


# --- search.json ------------------------------------------------------------------------------------


@SETTINGS
@given(file_bytes(good_spec()))
def test_any_search_json_gives_a_spec_in_range_or_a_note(raw):
    for directory in scratch():
        (directory / sd.SPEC_FILE).write_bytes(raw)
        try:
            spec = sd.read_spec(directory)
        except sd.SearchFileError as exc:
            assert sd.SPEC_FILE in str(exc)
            continue
        assert spec is not None and sd.spec_problem(asdict(spec)) is None
        assert spec.n_trials >= 1 and spec.workers >= 1 and spec.direction in ("maximize", "minimize")
        assert math.isfinite(spec.heartbeat_s) and spec.heartbeat_s > 0 and spec.stale_after_s > 0
        assert spec.data_sha256 is None or len(spec.data_sha256) == 64


@pytest.mark.parametrize("key, value", [
    ("n_trials", 0), ("n_trials", -3), ("n_trials", 1.5), ("n_trials", True), ("workers", 0), ("direction", "up"),
    ("heartbeat_s", 0), ("stale_after_s", -1.0), ("heartbeat_s", "30"), ("study_name", ""), ("params", {"x": 1}),
    ("fixed", [3]), ("enqueue", [1]), ("pruner", "median"), ("identity", {"data.sha256": "beef"}), ("identity", []),
])
def test_a_search_json_field_out_of_range_is_refused_naming_it(tmp_path, key, value):
    (tmp_path / sd.SPEC_FILE).write_text(json.dumps(dict(good_spec(), **{key: value})))
    with pytest.raises(sd.SearchFileError, match=rf"search.json: field '{key}'"):
        sd.read_spec(tmp_path)


def test_a_good_search_json_is_read_and_an_oversized_one_refused_naming_the_cap(tmp_path):
    (tmp_path / sd.SPEC_FILE).write_text(json.dumps(good_spec()))
    assert sd.read_spec(tmp_path).data_sha256 == "a" * 64  # type: ignore[union-attr]
    os.truncate(tmp_path / sd.SPEC_FILE, sd.MAX_SPEC_BYTES + 1)
    with pytest.raises(sd.SearchFileError, match=r"search.json is too big: it holds 1,048,577 bytes, and such a file never holds more than 1,048,576"):
        sd.read_spec(tmp_path)


# --- heartbeats -------------------------------------------------------------------------------------


@SETTINGS
@given(file_bytes(good_beat()))
def test_any_heartbeat_file_gives_a_beat_in_range_or_a_note(raw):
    for directory in scratch():
        (directory / sd.WORKERS_DIR).mkdir()
        (directory / sd.WORKERS_DIR / "w.json").write_bytes(raw)
        beats, notes = sd.read_beats(directory)
        assert len(beats) + len(notes) == 1
        for beat, _ in beats:
            assert sd.beat_problem(asdict(beat)) is None
            assert beat.trial is None or (isinstance(beat.trial, int) and beat.trial >= 0)
            assert all(isinstance(n, int) and n >= 0 for n in beat.trials_run)
            holder = beat.holder()
            assert holder is None or holder.pid > 0
        for note in notes:
            assert "w.json" in note


@pytest.mark.parametrize("key, value", [
    ("job_id", ""), ("job_id", 7), ("cluster", "pbs"), ("state", "zombie"), ("pid", -1), ("pid", 2**40), ("pid", 1.5),
    ("pid_start", "abc"), ("trial", -1), ("trial", 2.0), ("trial", True), ("trials_run", [0, -1]), ("trials_run", {}),
    ("host", 3), ("message", None),
])
def test_a_heartbeat_field_out_of_range_is_a_note_naming_it(tmp_path, key, value):
    (tmp_path / sd.WORKERS_DIR).mkdir()
    (tmp_path / sd.WORKERS_DIR / "w.json").write_text(json.dumps(dict(good_beat(), **{key: value})))
    beats, [note] = sd.read_beats(tmp_path)
    assert not beats and f"w.json: field '{key}'" in note or (key == "job_id" and "it has no job_id" in note), note


@pytest.mark.parametrize("job_id", ["²", "٣٤", "99999999999999999999", "12"])
def test_a_local_worker_not_started_is_known_by_a_plain_pid_only(job_id):
    beat = sd.WorkerBeat(job_id=job_id, cluster="local", host="h", state="queued")
    holder = beat.holder()
    assert (holder.pid if holder else None) == (12 if job_id == "12" else None)


def test_an_oversized_heartbeat_is_a_note_naming_its_cap(tmp_path):
    (tmp_path / sd.WORKERS_DIR).mkdir()
    path = tmp_path / sd.WORKERS_DIR / "w.json"
    path.write_bytes(b"")
    os.truncate(path, sd.MAX_BEAT_BYTES + 1)
    beats, [note] = sd.read_beats(tmp_path)
    assert not beats and "w.json is too big: it holds 2,097,153 bytes, and such a file never holds more than 2,097,152" in note


# --- the journal -----------------------------------------------------------------------------------


def journal_bytes() -> bytes:
    """A small journal as Optuna writes it (every kind of record the workers write)."""
    for directory in scratch():
        study = optuna.create_study(storage=sd.open_storage(directory), study_name="s", direction="maximize")
        study.enqueue_trial({"x": 0.5})
        for value in (0.5, 0.7):
            trial = study.ask({"x": FloatDistribution(0, 1), "c": CategoricalDistribution(["a", "b"])})
            trial.set_user_attr(sd.WORKER_ATTR, "w")
            trial.report(value, 1)
            study.tell(trial, value)
        return sd.journal_path(directory).read_bytes()
    raise AssertionError("unreachable")


JOURNAL = journal_bytes()
LINES = JOURNAL.splitlines(keepends=True)


def check_scan(scan: sd.JournalScan, raw: bytes) -> None:
    assert 0 <= scan.end <= scan.size == len(raw)
    assert all(sd.record_problem(r) is None for r in scan.records)
    assert (scan.torn is None) == (scan.end == len(raw))
    scan.storage().get_all_studies()  # the checked records replay


@SETTINGS
@given(st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from(LINES) | st.binary(max_size=60), max_size=8).map(b"".join),
    st.builds(lambda cut, tail: JOURNAL[:cut] + tail, st.integers(0, len(JOURNAL)), st.binary(max_size=80)),
    st.lists(JSON.map(lambda v: json.dumps(v).encode() + b"\n"), max_size=4).map(lambda ls: JOURNAL + b"".join(ls)),
))
def test_any_journal_bytes_give_checked_records_or_a_note(raw):
    for directory in scratch():
        path = directory / sd.JOURNAL_FILE
        path.write_bytes(raw)
        try:
            scan = sd.read_journal(path)
        except sd.JournalError as exc:
            assert str(path) in str(exc)
            continue
        assert scan is not None
        check_scan(scan, raw)
        torn = sd.torn_tail(path)  # the cheap check never calls a whole journal torn
        assert torn is None or torn[0] >= scan.end or scan.torn is not None


@SETTINGS
@given(st.integers(1, len(JOURNAL) - 1), st.binary(max_size=80).filter(lambda b: b"\n" not in b))
def test_a_journal_cut_anywhere_keeps_every_whole_record_and_repairs_to_them(cut, tail):
    """A writer killed at any byte (and whatever it left unwritten): the records before stay, the rest goes."""
    raw = JOURNAL[:cut] + tail
    whole = raw[: raw.rfind(b"\n") + 1]
    for directory in scratch():
        path = directory / sd.JOURNAL_FILE
        path.write_bytes(raw)
        scan = sd.read_journal(path)
        assert scan is not None and scan.end == len(whole) and len(scan.records) == whole.count(b"\n")
        cut = sd.cut_torn_tail(path)
        assert path.read_bytes() == whole
        assert (cut is None) == (whole == raw) and (cut is None or cut.copy.read_bytes() == raw)


def test_an_oversized_journal_record_is_named_without_being_parsed(tmp_path):
    path = tmp_path / sd.JOURNAL_FILE
    path.write_bytes(JOURNAL + b"[" * (sd.MAX_RECORD_BYTES + 10) + b"\n" + LINES[-1])
    tracemalloc.start()
    with pytest.raises(sd.JournalError, match=rf"line {len(LINES) + 1} .* longer than 1,048,576 bytes"):
        sd.read_journal(path)
    assert tracemalloc.get_traced_memory()[1] < 8 << 20  # the file (2 MB) and no parse of the long line
    tracemalloc.stop()


# --- the lock's link and the status built from all of them ------------------------------------------


LOCK_HOLDER = st.fixed_dictionaries({}, optional={
    "host": st.just(os.uname().nodename) | JSON, "pid": st.integers(-2, 2**70) | JSON, "start": JSON, "token": JSON})


@SETTINGS
@given(st.text(max_size=200) | LOCK_HOLDER.map(json.dumps))
def test_any_lock_text_is_judged_without_an_error(text):
    assert sd._holder_is_gone(sd._LOCK_PREFIX + text) in (True, False)
    assert sd._holder_is_gone(text) is False or text.startswith(sd._LOCK_PREFIX)


def test_lock_texts_that_name_no_live_process_here():
    dead = sd._LOCK_PREFIX + json.dumps({"host": os.uname().nodename, "pid": 2**40, "start": None})
    assert sd._holder_is_gone(dead) is False  # not a pid this module writes: only the grace period frees it
    assert sd._holder_is_gone(sd._LOCK_PREFIX + json.dumps({"host": os.uname().nodename, "pid": os.getpid()})) is False


@SETTINGS
@given(file_bytes(good_spec()), file_bytes(good_beat()), st.one_of(
    st.binary(max_size=200),
    st.builds(lambda cut, tail: JOURNAL[:cut] + tail, st.integers(0, len(JOURNAL)), st.binary(max_size=40)),
    st.just(JOURNAL.replace(b'"value":0.7', b'"value":7.0').replace(b"[0.7]", b"[7.0]")),
))
def test_status_of_any_search_directory_shows_values_in_range_and_notes(spec, beat, journal):
    for directory in scratch():
        (directory / sd.SPEC_FILE).write_bytes(spec)
        (directory / sd.WORKERS_DIR).mkdir()
        (directory / sd.WORKERS_DIR / "w.json").write_bytes(beat)
        sd.journal_path(directory).write_bytes(journal)
        view = status.read_study(directory, with_slurm=False)
        status.format_status(view)
        data = status.status_json(view)
        json.dumps(data)
        values = [t["value"] for t in data["trials"]] + ([data["best"]["value"]] if data["best"] else [])
        assert all(v is None or 0 <= v <= 1 for v in values)
        if view.journal_problem is not None:
            assert any(view.journal_problem in n for n in view.notes)
