"""Readers of the run directory's files: every number they return can be true, and no bytes make
them raise anything but RunFileError or allocate without bound (issue 21, I5 and I6).

The oracle here (:func:`assert_in_range`) restates the ranges from the issue independently of the
readers' own checks: a reader that let a value through unchecked fails it.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mnist_hpc import rundir
from mnist_hpc.config import Config
from mnist_hpc.rundir.files import MAX_BYTES, PID_MAX
from mnist_hpc.rundir.outputs import _max_predictions_bytes
from tests.helpers import fake_metrics, fake_predictions, make_trial

OVERRIDES = str(rundir.HYDRA_OVERRIDES)
JSON_READERS: dict[str, Callable[[Path], Any]] = {
    rundir.JOB_FILE: rundir.read_job,
    rundir.METRICS_FILE: rundir.read_metrics,
    rundir.PROGRESS_FILE: rundir.read_progress,
    rundir.FAILURE_FILE: rundir.read_failure,
    rundir.IDENTITY_FILE: rundir.read_identity,
    rundir.LEASE_FILE: rundir.read_lease,
}
YAML_READERS: dict[str, Callable[[Path], Any]] = {
    rundir.CONFIG_FILE: rundir.planned_epochs,
    OVERRIDES: rundir.hydra_overrides,
}
READERS = {**JSON_READERS, **YAML_READERS, rundir.PREDICTIONS_FILE: rundir.load_predictions}
# No example database: nothing written into the checkout (CI runs on a fresh clone anyway).
PROPERTY = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def history(epochs: int, val: bool = True) -> list[dict[str, Any]]:
    """Per-epoch records as training writes them (validation peaking at epoch 2)."""
    rows = []
    for e in range(1, epochs + 1):
        row: dict[str, Any] = {"epoch": e, "accuracy": 0.9 + e / 100, "loss": 0.3 / e, "seconds": 2.5}
        if val:
            row.update(val_accuracy=0.95 if e == 2 else 0.93, val_loss=0.2 / e)
        rows.append(row)
    return rows


def valid_metrics() -> dict[str, Any]:
    return {**fake_metrics(0.97), "history": history(3), "val_accuracy": 0.93, "best_val_accuracy": 0.95}


def write_valid(run_dir: Path) -> None:
    """Every file the readers read, each through its real writer."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_job(run_dir, rundir.JobRecord(cluster="slurm", job_id="9_1", run_dir=str(run_dir), trial=1,
                                               overrides=["train.seed=1"], array_job_id="9", array_task_id=1))
    rundir.write_metrics(run_dir, valid_metrics())
    rundir.write_progress(run_dir, 2, 3, history(2))
    rundir.write_failure(run_dir, ValueError("boom"))
    rundir.write_identity(run_dir, {"train.seed": 1}, "abc")
    rundir.write_lease(run_dir, {"host": "h", "pid": 1, "pid_start": "5", "slurm_job_id": "9", "job_label": "9_1",
                                 "user": "u"})
    rundir.write_config(run_dir, Config())
    (run_dir / rundir.HYDRA_DIR).mkdir(exist_ok=True)
    (run_dir / OVERRIDES).write_text(yaml.safe_dump(["train.seed=1", "optimizer=adam"]))
    fake_predictions(run_dir, {3: (5, 0.9)})


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    run_dir = tmp_path_factory.mktemp("valid")
    write_valid(run_dir)
    return {name: (run_dir / name).read_bytes() for name in READERS}


# --- the oracle -------------------------------------------------------------------------------


def _real(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def assert_history(rows: list[dict[str, Any]]) -> None:
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    for row in rows:
        for key, value in row.items():
            assert _real(value), (key, value)
            if key.endswith("accuracy"):
                assert 0 <= value <= 1, (key, value)
            if key.endswith("loss") or key == "seconds":
                assert value >= 0, (key, value)


def assert_in_range(name: str, value: Any) -> None:
    """What the issue asks of every value a reader returns."""
    if name == rundir.JOB_FILE:
        assert isinstance(value.job_id, str) and value.job_id.strip() and value.cluster in ("slurm", "local")
        for count in (value.trial, value.array_task_id, value.packed_slot):
            assert count is None or (type(count) is int and count >= 0)
        assert type(value.tasks) is int and value.tasks >= 1
        assert all(isinstance(o, str) for o in value.overrides)
        printable = vars(value)
    elif name == rundir.METRICS_FILE:
        assert_history(value["history"])
        assert len(value["history"]) >= 1
        for key in ("test_accuracy", "val_accuracy", "best_val_accuracy"):
            assert (key != "test_accuracy" and value.get(key) is None) or (_real(value[key]) and 0 <= value[key] <= 1)
        for key in ("test_loss", "wall_time_s", "train_time_s"):
            assert value.get(key) is None or (_real(value[key]) and value[key] >= 0)
        assert value.get("epochs_completed") in (None, len(value["history"]))
        val = [r["val_accuracy"] for r in value["history"] if "val_accuracy" in r]
        if value.get("best_val_accuracy") is not None:
            assert value["best_val_accuracy"] == max(val)  # and a best needs a history to be the best of
        printable = value
    elif name == rundir.PROGRESS_FILE:
        assert type(value.epochs_done) is int and type(value.epochs_planned) is int
        assert 0 <= value.epochs_done <= value.epochs_planned and len(value.history) == value.epochs_done
        assert_history(value.history)
        printable = vars(value)
    elif name == rundir.LEASE_FILE:
        holder = value["holder"]
        assert type(holder["pid"]) is int and 1 <= holder["pid"] <= PID_MAX and isinstance(holder["host"], str)
        printable = value
    elif name == rundir.IDENTITY_FILE:
        assert isinstance(value["fingerprint"], str) and isinstance(value["config"], dict)
        printable = value
    elif name == rundir.FAILURE_FILE:
        assert isinstance(value, str)
        printable = value
    elif name == rundir.CONFIG_FILE:
        assert type(value) is int and value >= 1
        printable = value
    elif name == OVERRIDES:
        assert isinstance(value, list) and all(isinstance(o, str) for o in value)
        printable = value
    else:
        n = value.y_true.shape[0]
        assert value.y_prob.shape == (n, 10) and value.y_pred.shape == (n,) and n <= 300_000
        assert np.all(np.isfinite(value.y_prob)) and np.all((value.y_prob >= 0) & (value.y_prob <= 1))
        assert np.allclose(value.y_prob.sum(axis=1), 1, atol=1e-3)
        assert np.all(value.y_true < 10) and np.all(value.y_pred < 10)
        assert value.wrong_images.shape == (len(value.wrong_index), 28, 28) and len(value.wrong_index) <= 64
        assert np.all((value.wrong_index >= 0) & (value.wrong_index < n))
        return
    # Whatever is shown can be printed and written to a UTF-8 report.
    json.dumps(printable, ensure_ascii=False, default=str).encode("utf-8")


def read_or_refuse(run_dir: Path, name: str) -> Any:
    """The reader's value, checked by the oracle; None when it refused with a RunFileError naming the file."""
    try:
        value = READERS[name](run_dir)
    except rundir.RunFileError as exc:
        assert str(run_dir / name) in str(exc), exc  # the message names the file
        return None
    assert_in_range(name, value)
    return value


# --- each reader at its boundaries ------------------------------------------------------------


class Raw(str):
    """JSON text put in as it is (NaN, Infinity, 1e999), which json.dumps will not write."""


ACCURACY = ([0, 1, 0.0, 1.0, 0.5], [-1e-9, 1 + 1e-9, -3, True, False, "0.9", [0.9], 10**400,
                                    Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999")])
NON_NEGATIVE = ([0, 0.0, 12.5], [-1e-9, -3, True, "1", 10**400, Raw("NaN"), Raw("Infinity"), Raw("1e999")])
COUNT = ([0, 7], [-1, 1.5, 1.0, True, "1", Raw("NaN")])
POSITIVE = ([1, 7], [0, -1, 1.0, True, "1", Raw("Infinity")])
PID = ([1, PID_MAX], [0, -1, PID_MAX + 1, 2**64, True, 1.0, "1"])

# (file, base record, path of the field, values accepted and refused)
FIELD_CASES = [
    (rundir.METRICS_FILE, fake_metrics(0.97), ("test_accuracy",), ACCURACY),
    # One epoch: its val_accuracy is the final and the best (set together below).
    (rundir.METRICS_FILE, {**fake_metrics(0.97), "history": history(1), "epochs_completed": 1},
     ("best_val_accuracy",), ACCURACY),
    (rundir.METRICS_FILE, fake_metrics(0.97), ("test_loss",), NON_NEGATIVE),
    (rundir.METRICS_FILE, fake_metrics(0.97), ("wall_time_s",), NON_NEGATIVE),
    (rundir.METRICS_FILE, fake_metrics(0.97), ("train_time_s",), NON_NEGATIVE),
    (rundir.METRICS_FILE, fake_metrics(0.97), ("history", 0, "accuracy"), ACCURACY),
    (rundir.METRICS_FILE, fake_metrics(0.97), ("history", 2, "loss"), NON_NEGATIVE),
    (rundir.METRICS_FILE, fake_metrics(0.97), ("history", 1, "seconds"), NON_NEGATIVE),
    (rundir.PROGRESS_FILE, {"epochs_done": 2, "epochs_planned": 3, "history": history(2)},
     ("history", 1, "val_accuracy"), ACCURACY),
    (rundir.PROGRESS_FILE, {"epochs_done": 2, "epochs_planned": 3, "history": history(2)},
     ("history", 0, "val_loss"), NON_NEGATIVE),
    (rundir.PROGRESS_FILE, {"epochs_done": 0, "epochs_planned": 3, "history": []}, ("epochs_planned",), POSITIVE),
    (rundir.JOB_FILE, {"job_id": "9_1", "cluster": "slurm"}, ("trial",), COUNT),
    (rundir.JOB_FILE, {"job_id": "9_1", "cluster": "slurm"}, ("array_task_id",), COUNT),
    (rundir.JOB_FILE, {"job_id": "9_1", "cluster": "slurm"}, ("packed_slot",), COUNT),
    (rundir.JOB_FILE, {"job_id": "9_1", "cluster": "slurm"}, ("tasks",), POSITIVE),
    (rundir.LEASE_FILE, {"holder": {"host": "h", "pid": 1}}, ("holder", "pid"), PID),
]


def json_text(record: Any) -> str:
    """``record`` as JSON, with Raw values put in as they are."""
    raws: list[str] = []

    def default(value: Any) -> Any:
        raise TypeError(value)

    def swap(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(str(value))
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(record), default=default)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', raw)
    return text


# Fields that must agree with the one a case sets: they are set to the same value.
LINKED = {("best_val_accuracy",): [("val_accuracy",), ("history", 0, "val_accuracy")]}


def set_at(record: Any, path: tuple[Any, ...], value: Any) -> Any:
    record = json.loads(json.dumps(record))
    for each in (path, *LINKED.get(path, [])):
        target = record
        for key in each[:-1]:
            target = target[key]
        target[each[-1]] = value
    return record


@pytest.mark.parametrize(("name", "base", "path", "values"), FIELD_CASES,
                         ids=[f"{c[0]}:{'.'.join(map(str, c[2]))}" for c in FIELD_CASES])
def test_each_field_is_accepted_in_range_and_refused_outside_it(tmp_path: Path, name, base, path, values) -> None:
    accepted, refused = values
    assert READERS[name](tmp_path) is None  # absent: not there yet
    for value in accepted:
        (tmp_path / name).write_text(json_text(set_at(base, path, value)))
        result = READERS[name](tmp_path)
        assert_in_range(name, result)
    for value in refused:
        (tmp_path / name).write_text(json_text(set_at(base, path, value)))
        with pytest.raises(rundir.RunFileError) as caught:
            READERS[name](tmp_path)
        message = str(caught.value)
        assert str(tmp_path / name) in message
        if not isinstance(value, Raw):  # NaN and the like are refused as JSON, before any field
            names = [f"field '{'.'.join(map(str, each))}'" if len(each) < 3 else f"[{each[-1]!r}]"
                     for each in (path, *LINKED.get(path, []))]
            assert any(n in message for n in names), (names, message)
            assert repr(value)[:20] in message, message


def test_the_numbers_of_a_record_must_agree_with_each_other(tmp_path: Path) -> None:
    def refused(name: str, record: Any, *needles: str) -> None:
        (tmp_path / name).write_text(json_text(record))
        with pytest.raises(rundir.RunFileError) as caught:
            READERS[name](tmp_path)
        for needle in (str(tmp_path / name), *needles):
            assert needle in str(caught.value)

    progress = {"epochs_done": 2, "epochs_planned": 3, "history": history(2)}
    (tmp_path / rundir.PROGRESS_FILE).write_text(json_text(progress))
    assert rundir.read_progress(tmp_path).epochs_done == 2
    refused(rundir.PROGRESS_FILE, {**progress, "epochs_planned": 1}, "epochs_done is 2, more than epochs_planned (1)")
    refused(rundir.PROGRESS_FILE, {**progress, "epochs_done": 1}, "history holds 2 epoch(s) but epochs_done is 1")
    refused(rundir.PROGRESS_FILE, {**progress, "history": history(2)[::-1]}, "['epoch'] is 2, expected 1")
    refused(rundir.PROGRESS_FILE, set_at(progress, ("history", 0, "epoch"), 0), "['epoch'] is 0, expected 1")
    refused(rundir.PROGRESS_FILE, set_at(progress, ("history", 1, "epoch"), 2.0), "['epoch'] is 2.0, expected 2")
    refused(rundir.PROGRESS_FILE, set_at(progress, ("history", 1), [2]), "history[1] is [2], expected an object")
    (tmp_path / rundir.PROGRESS_FILE).write_text(json_text({"epochs_done": 0, "epochs_planned": 1, "history": []}))
    assert rundir.read_progress(tmp_path).epochs_done == 0  # 0 of 1: started, no epoch yet

    metrics = valid_metrics()
    (tmp_path / rundir.METRICS_FILE).write_text(json_text(metrics))
    assert rundir.read_metrics(tmp_path)["best_val_accuracy"] == 0.95
    refused(rundir.METRICS_FILE, {**metrics, "epochs_completed": 2}, "epochs_completed is 2 but its history holds 3")
    refused(rundir.METRICS_FILE, {**metrics, "best_val_accuracy": 0.96}, "best_val_accuracy is 0.96 but the best")
    refused(rundir.METRICS_FILE, {**metrics, "best_val_accuracy": 0.93}, "best_val_accuracy is 0.93 but the best")
    refused(rundir.METRICS_FILE, {**metrics, "val_accuracy": 0.95}, "val_accuracy is 0.95 but the last")
    refused(rundir.METRICS_FILE, {**fake_metrics(0.97), "best_val_accuracy": 1.0},  # a history without validation
            "best_val_accuracy is 1.0 but its history holds no val_accuracy")
    refused(rundir.METRICS_FILE, {**fake_metrics(0.97), "val_accuracy": 0.5}, "val_accuracy is 0.5 but its history")
    refused(rundir.METRICS_FILE, {**metrics, "history": [], "epochs_completed": None, "val_accuracy": None,
                                  "best_val_accuracy": None}, "history is empty")
    refused(rundir.METRICS_FILE, {"history": history(1)}, "field 'test_accuracy' is None, expected a number in [0, 1]")

    job = {"job_id": "9_1", "cluster": "slurm"}
    for job_id, cluster in (("123", "slurm"), ("123_4", "slurm"), ("4242", "local"), ("node1-4242", "local")):
        (tmp_path / rundir.JOB_FILE).write_text(json_text({"job_id": job_id, "cluster": cluster}))
        assert rundir.read_job(tmp_path).job_id == job_id
    refused(rundir.JOB_FILE, {**job, "job_id": "abc"}, "'job_id' is 'abc', expected a Slurm job id")
    refused(rundir.JOB_FILE, {**job, "job_id": "1,2"}, "expected a Slurm job id")  # would break sacct for all
    refused(rundir.JOB_FILE, {**job, "job_id": "9" * 40, "cluster": "local"}, "expected a process id")
    refused(rundir.JOB_FILE, {**job, "job_id": "\u0663", "cluster": "local"}, "expected a process id")  # an Arabic 3
    refused(rundir.JOB_FILE, {**job, "cluster": "pbs"}, "'cluster' is 'pbs'")
    refused(rundir.JOB_FILE, {**job, "overrides": ["a=1", {"b": 2}]}, "expected a list of strings")

    lease = {"holder": {"host": "h", "pid": 12}}
    refused(rundir.LEASE_FILE, {"holder": {"pid": 12}}, "field 'holder.host' is None, expected a string")
    refused(rundir.LEASE_FILE, {"holder": {"host": "h", "pid": 12, "slurm_job_id": "--help"}}, "holder.slurm_job_id")
    refused(rundir.LEASE_FILE, {**lease, "holder": []}, "field 'holder' is [], expected an object")
    refused(rundir.FAILURE_FILE, {"error": 3}, "field 'error' is 3, expected a string")
    refused(rundir.FAILURE_FILE, {"error": "x", "traceback": ["a"]}, "field 'traceback'")
    refused(rundir.IDENTITY_FILE, {"fingerprint": "", "config": {}}, "'fingerprint' is ''")


def test_yaml_readers_at_their_boundaries(tmp_path: Path) -> None:
    assert rundir.planned_epochs(tmp_path) is None and rundir.hydra_overrides(tmp_path) == []  # not there yet
    (tmp_path / rundir.HYDRA_DIR).mkdir()
    cases = {
        "train:\n  epochs: 1\n": 1,
        "train:\n  epochs: 0\n": "'train.epochs' is 0, expected a whole number >= 1",
        "train:\n  epochs: .inf\n": "'train.epochs' is inf",
        "train:\n  epochs: 5.0\n": "'train.epochs' is 5.0",
        "train:\n  epochs: true\n": "'train.epochs' is True",
        "train:\n  epochs: '5'\n": "'train.epochs' is '5'",
        "train: 5\n": "field 'train' is 5, expected an object",
        "": "its content is None, expected an object",
        f"train:\n  epochs: {'9' * 5000}\n": "is not readable YAML",  # beyond int()'s digit limit
        "train:\n  epochs: !!timestamp x\n": "is not readable YAML",
        "when: 2001-13-01\n": "is not readable YAML",  # a 13th month
        "? [1]\n: 2\n": "is not readable YAML",  # an unhashable key
        '!!python/object/apply:os.system ["echo pwned"]\n': "is not readable YAML",
        "train: {epochs: &e 5, again: *e}\n": "alias",
    }
    for text, want in cases.items():
        (tmp_path / rundir.CONFIG_FILE).write_text(text)
        if isinstance(want, int):
            assert rundir.planned_epochs(tmp_path) == want
        else:
            with pytest.raises(rundir.RunFileError, match=str(tmp_path / rundir.CONFIG_FILE)) as caught:
                rundir.planned_epochs(tmp_path)
            assert want in str(caught.value), (text[:40], str(caught.value))
    overrides = tmp_path / OVERRIDES
    overrides.write_text("[]\n")
    assert rundir.hydra_overrides(tmp_path) == []
    overrides.write_text("- a=1\n- '+b=x y'\n")
    assert rundir.hydra_overrides(tmp_path) == ["a=1", "+b=x y"]
    for text in ("{a: 1}\n", "- [a, b]\n", "- 5\n", "", '- "\\ud800"\n'):
        overrides.write_text(text)
        with pytest.raises(rundir.RunFileError, match=str(overrides)):
            rundir.hydra_overrides(tmp_path)


def test_yaml_aliases_are_refused_before_anything_walks_them(tmp_path: Path) -> None:
    """A billion laughs in overrides.yaml: nine levels of nine aliases in a few hundred bytes, which
    the old reader's ``str(item)`` of each item expanded into 9**9 strings."""
    items = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (tmp_path / rundir.HYDRA_DIR).mkdir()
    (tmp_path / OVERRIDES).write_text("".join(f"- {item}\n" for item in items))
    assert (tmp_path / OVERRIDES).stat().st_size < 1000
    error = call_with_deadline(lambda: rundir.hydra_overrides(tmp_path)).get("error")
    assert isinstance(error, rundir.RunFileError) and "found an alias" in str(error), error


# --- hostile files, for every reader ----------------------------------------------------------


def _sparse(size: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        with open(path, "wb") as fh:
            fh.truncate(size)
    return make


def _text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


HOSTILE: dict[str, Callable[[Path], None]] = {
    "10,000,000 bytes": _sparse(10_000_000),
    "13,000,000 bytes": _sparse(13_000_000),  # beyond predictions.npz's cap too
    "100,000 levels of lists": _text("[" * 100_000 + "]" * 100_000),
    "100,000 levels of objects": _text('{"a":' * 100_000 + "1" + "}" * 100_000),
    "30,000 levels of YAML flow": _text("[" * 30_000 + "]" * 30_000),
    "a FIFO": lambda path: os.mkfifo(path),
    "a directory": lambda path: path.mkdir(),
    "a symlink to /dev/zero": lambda path: path.symlink_to("/dev/zero"),
    "a dangling symlink loop": lambda path: path.symlink_to(path.name),
    "invalid UTF-8": lambda path: path.write_bytes(b'{"job_id": "\xff\xfe", "error": "\xc0\xaf"}'),
    "a lone surrogate": _text('{"job_id": "\\ud800", "error": "\\udfff", "holder": {"host": "\\ud800", "pid": 1}}'),
    "a NUL byte": lambda path: path.write_bytes(b'{"error": "x"}\x00'),
}


def call_with_deadline(fn: Callable[[], Any], release: Callable[[], None] = lambda: None, seconds: float = 30) -> dict[str, Any]:
    """Run ``fn`` in a thread: a reader that blocks (on a FIFO) fails the test instead of hanging it
    (``release`` then lets the thread end)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (reported by the caller)
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        release()
        thread.join(5)
        raise AssertionError("the reader blocked")
    return outcome


def open_for_writing(path: Path) -> None:
    """Open and close a FIFO for writing: a reader blocked on opening it goes on."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.mark.parametrize("hostile", sorted(HOSTILE))
@pytest.mark.parametrize("name", sorted(READERS))
def test_a_hostile_file_is_a_run_file_error_naming_it(tmp_path: Path, name: str, hostile: str) -> None:
    (tmp_path / rundir.HYDRA_DIR).mkdir()
    path = tmp_path / name
    HOSTILE[hostile](path)
    outcome = call_with_deadline(lambda: READERS[name](tmp_path), lambda: open_for_writing(path))
    error = outcome.get("error")
    assert isinstance(error, rundir.RunFileError), outcome
    message = str(error)
    assert str(path) in message
    cap = _max_predictions_bytes() if name == rundir.PREDICTIONS_FILE else MAX_BYTES[Path(name).name]
    if hostile.endswith("000 bytes") and path.stat().st_size > cap:
        assert f"{path} is too big: it holds {path.stat().st_size:,} bytes" in message
        assert f"never holds more than {cap:,}" in message
    elif hostile in ("a FIFO", "a directory", "a symlink to /dev/zero"):
        assert f"{path} is not a regular file" in message
    elif hostile.startswith("100,000 levels") and name in JSON_READERS and len(path.read_bytes()) <= cap:
        assert "nests deeper than 16 levels" in message
    elif hostile.startswith("30,000 levels") and name in YAML_READERS:
        assert "nesting deeper than 16 levels" in message


def test_a_run_file_nested_just_too_deep_is_refused(tmp_path: Path) -> None:
    nested: Any = 1
    for _ in range(16):
        nested = [nested]
    (tmp_path / rundir.METRICS_FILE).write_text(json.dumps({**fake_metrics(0.9), "extra": nested}))
    with pytest.raises(rundir.RunFileError, match="nests deeper than 16 levels"):
        rundir.read_metrics(tmp_path)
    (tmp_path / rundir.METRICS_FILE).write_text(json.dumps({**fake_metrics(0.9), "extra": nested[0]}))
    assert rundir.read_metrics(tmp_path)["test_accuracy"] == 0.9  # 16 levels: the cap itself


def test_log_tails_are_bounded_and_never_block(tmp_path: Path) -> None:
    from mnist_hpc.login.trials import LOG_TAIL_BYTES, last_error_line

    os.mkfifo(tmp_path / "fifo.err")
    (tmp_path / "dir.err").mkdir()
    for log in (tmp_path / "fifo.err", Path("/dev/zero"), tmp_path / "dir.err", tmp_path / "absent.err",
                tmp_path / "nul\x00.err"):
        outcome = call_with_deadline(lambda: last_error_line(log), lambda: open_for_writing(tmp_path / "fifo.err"))
        assert outcome == {"value": None}, (log, outcome)
    # A long log: only its end is read, and the traceback that ended the job is there.
    log = tmp_path / "long.err"
    with open(log, "wb") as fh:
        fh.write(b"x" * (3 * LOG_TAIL_BYTES) + b"\nTraceback (most recent call last):\n  File x\nValueError: late\n")
    assert last_error_line(log) == "ValueError: late"


# --- predictions.npz ------------------------------------------------------------------------


def npz_bytes(members: dict[str, bytes], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def prediction_members(n: int = 20, k: int = 1) -> dict[str, np.ndarray]:
    prob = np.full((n, 10), 0.01, np.float32)
    y_true = (np.arange(n) % 10).astype(np.uint8)
    prob[np.arange(n), y_true] = 0.91
    prob[:k] = 0.01
    prob[np.arange(k), (y_true[:k] + 1) % 10] = 0.91  # the first k are wrong
    return {"y_true": y_true, "y_pred": prob.argmax(1).astype(np.uint8), "y_prob": prob,
            "wrong_index": np.arange(k, dtype=np.int64), "wrong_images": np.zeros((k, 28, 28), np.uint8)}


def test_predictions_are_checked_before_numpy_allocates(tmp_path: Path) -> None:
    path = tmp_path / rundir.PREDICTIONS_FILE
    members = prediction_members()
    path.write_bytes(npz_bytes({f"{k}.npy": npy(v) for k, v in members.items()}))
    assert rundir.load_predictions(tmp_path).y_true.shape == (20,)

    def refused(data: bytes, needle: str) -> None:
        path.write_bytes(data)
        with pytest.raises(rundir.RunFileError) as caught:
            rundir.load_predictions(tmp_path)
        assert str(path) in str(caught.value) and needle in str(caught.value), str(caught.value)

    def with_member(key: str, array: np.ndarray, **extra: bytes) -> bytes:
        return npz_bytes({**{f"{k}.npy": npy(v) for k, v in members.items()}, f"{key}.npy": npy(array), **extra})

    # More test digits than any dataset holds: refused from the headers (16 MB of zeros deflate to 16 kB).
    big = prediction_members(n=300_001, k=0)
    refused(npz_bytes({f"{k}.npy": npy(v) for k, v in big.items()}, compress=True), "holds 300001 test digits")
    refused(with_member("y_prob", np.zeros((20, 10), np.float64)), "y_prob is float64 of shape (20, 10), expected float32")
    refused(with_member("y_true", np.zeros(20, "<U50")), "y_true is <U50")  # numpy would allocate 200 B a label
    refused(with_member("y_pred", np.zeros(21, np.uint8)), "y_pred is uint8 of shape (21,), expected uint8 of shape (20,)")
    refused(with_member("wrong_images", np.zeros((1, 28, 29), np.uint8)), "wrong_images is uint8 of shape (1, 28, 29)")
    refused(with_member("wrong_index", np.arange(65, dtype=np.int64)), "wrong_images is uint8 of shape (1, 28, 28), expected uint8 of shape (65, 28, 28)")
    refused(with_member("y_true", members["y_true"], **{"y_true": npy(np.zeros(10**6, np.uint8))}), "holds the members")
    refused(npz_bytes({f"{k}.npy": npy(v) for k, v in members.items() if k != "y_prob"}), "holds the members")
    # Values that cannot be a run's: NaN or beyond [0, 1], labels beyond 9, kept digits that were right.
    prob = members["y_prob"].copy()
    prob[5, 0] = np.nan
    refused(with_member("y_prob", prob), "cannot be a run's predictions")
    refused(with_member("y_prob", members["y_prob"] * 2), "cannot be a run's predictions")
    refused(with_member("y_prob", members["y_prob"] / 2), "cannot be a run's predictions")  # rows sum to 0.5
    refused(with_member("y_true", np.full(20, 10, np.uint8)), "cannot be a run's predictions")
    refused(with_member("y_pred", (members["y_pred"] + 1) % 10), "cannot be a run's predictions")  # not the argmax
    refused(with_member("wrong_index", np.array([5], np.int64)), "cannot be a run's predictions")  # 5 was right
    refused(with_member("wrong_index", np.array([20], np.int64)), "cannot be a run's predictions")


def test_a_decompression_bomb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    """y_prob of 11,000,000 x 10 float32 (440 MB inflated) in a file under 2 MB, within the file
    size cap: refused from its header. Measured in a child of its own (peak RSS of that child)."""
    n = 11_000_000
    path = tmp_path / rundir.PREDICTIONS_FILE
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, (descr, shape) in {"y_true": ("|u1", (n,)), "y_pred": ("|u1", (n,)), "y_prob": ("<f4", (n, 10)),
                                    "wrong_index": ("<i8", (0,)), "wrong_images": ("|u1", (0, 28, 28))}.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, {"descr": descr, "fortran_order": False, "shape": shape})
                left = math.prod(shape) * np.dtype(descr).itemsize
                while left:
                    left -= member.write(zeros[: min(left, len(zeros))])
    assert path.stat().st_size < 2_000_000
    peak_kb, out = child_peak_rss([sys.executable, "-c", textwrap.dedent(f"""
        from mnist_hpc import rundir
        try:
            rundir.load_predictions({str(tmp_path)!r})
        except rundir.RunFileError as exc:
            print(exc)
    """)])
    assert "holds 11000000 test digits" in out
    assert peak_kb < 200_000, f"peak RSS {peak_kb} kB"


# --- status and report, end to end ------------------------------------------------------------


def child_peak_rss(command: list[str]) -> tuple[int, str]:
    """Run ``command`` under a Python of its own that reports the command's peak RSS (kB) and output.

    getrusage(RUSAGE_CHILDREN) is the largest of all children a process waited for: measured in
    a fresh parent it is this command's own, whatever ran before in the test session.
    """
    probe = textwrap.dedent("""
        import json, resource, subprocess, sys
        proc = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True, timeout=600)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(json.dumps({"peak_kb": peak, "rc": proc.returncode, "out": proc.stdout + proc.stderr}))
    """)
    env = {**os.environ, "PATH": "/nonexistent-no-slurm"}  # states from the files
    result = subprocess.run([sys.executable, "-c", probe, json.dumps(command)], capture_output=True, text=True,
                            timeout=700, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rc"] == 0, report["out"]
    assert "Traceback" not in report["out"], report["out"]
    return report["peak_kb"], report["out"]


def sweep_without_validation(sweep: Path) -> Path:
    """Seven finished trials ranked by test accuracy (no validation data): trial 6 would be best."""
    sweep.mkdir(parents=True)
    for num in range(7):
        make_trial(sweep, num, [f"train.seed={num}"], started_epochs=3, metrics=fake_metrics(0.90 + num / 100),
                   mistakes={1: (2, 0.8)}, ended=True)
    return sweep


def run_cli(main: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": "/nonexistent-no-slurm"}
    code = f"import sys; from mnist_hpc.cli import {main}; sys.argv[1:] = {list(args)!r}; {main}()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("raw", ["Infinity", "NaN", "-3", "1e999", "1.0000001", "true"])
def test_a_trial_whose_test_accuracy_cannot_be_is_a_note_never_ranked(tmp_path: Path, raw: str) -> None:
    """The issue's case: "Best trial: 6 ... test accuracy inf"."""
    sweep = sweep_without_validation(tmp_path / "sweep")
    metrics_file = sweep / "6" / rundir.METRICS_FILE
    metrics_file.write_text(json_text({**fake_metrics(0.96), "test_accuracy": Raw(raw)}))

    status = run_cli("status_main", "--json", str(sweep))
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    rows = {r["trial"]: r for r in json.loads(status.stdout)}
    assert sorted(rows) == list(range(7))
    assert f"note: trial 6: {metrics_file}" in status.stderr
    assert rows[6]["state"] == "FAILED" and [rows[n]["state"] for n in range(6)] == ["COMPLETED"] * 6

    report = run_cli("report_main", str(sweep))
    assert report.returncode == 0 and "Traceback" not in report.stdout + report.stderr, report.stderr
    out = report.stdout
    assert "**Best trial: 5**" in out and "test accuracy 0.9500" in out
    assert "Best trial: 6" not in out
    assert f"- note: trial 6: {metrics_file}" in out
    row = next(line for line in out.splitlines() if line.startswith("| 6 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2] == "FAILED" and cells[5:8] == ["-", "-", "-"]  # no best val, final val or test accuracy
    csv_rows = (sweep / "report" / "report.csv").read_text().splitlines()
    trial6 = next(line for line in csv_rows if line.startswith("6,"))
    assert ",FAILED," in trial6 and "inf" not in trial6.lower() and "nan" not in trial6.lower()


def test_a_200_mb_metrics_file_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    """Status and report read a 200 MB metrics.json whole before (22.9 GB RSS for the issue's set)."""
    sweep = sweep_without_validation(tmp_path / "sweep")
    big = sweep / "6" / rundir.METRICS_FILE
    record = json.dumps({"epoch": 1, "accuracy": 0.9, "loss": 0.1, "seconds": 1.0}) + ","
    with open(big, "w") as fh:
        fh.write('{"test_accuracy": 0.99, "history": [')
        chunk = record * ((1 << 20) // len(record) + 1)
        while fh.tell() < 200_000_000:
            fh.write(chunk)
        fh.write(record[:-1] + "]}")
    size = big.stat().st_size
    for main, args in (("status_main", ["--json", str(sweep)]), ("report_main", [str(sweep)])):
        code = f"import sys; from mnist_hpc.cli import {main}; sys.argv[1:] = {args!r}; {main}()"
        peak_kb, out = child_peak_rss([sys.executable, "-c", code])
        assert f"{big} is too big: it holds {size:,} bytes" in out, out[-2000:]
        assert peak_kb < 500_000, f"{main}: peak RSS {peak_kb} kB"


# --- properties: any bytes, any JSON, near-valid records ---------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from([0, 1, -1, -3, 0.5, 1e-9, -1e-9, 1 + 1e-9, PID_MAX + 1, 2**63, 10**30, "", "1", "9_1", "\ud800"]),
)
JSON_VALUES = st.recursive(
    SCALARS, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value (each key of each object, each item of each list)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths_of(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths_of(child, (*prefix, index))
    return found


def mutate(value: Any, path: tuple[Any, ...], how: str, new: Any) -> Any:
    """``value`` with the item at ``path`` replaced, deleted, or given a sibling key."""
    value = json.loads(json.dumps(value))
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if how == "replace":
        parent[path[-1]] = new
    elif how == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[f"extra{len(parent)}"] = new
    else:
        parent.insert(path[-1], new)
    return value


def place(tmp_path: Path, name: str, data: bytes) -> None:
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(data)


@pytest.mark.parametrize("name", sorted(READERS))
@PROPERTY
@given(data=st.binary(max_size=600))
def test_any_bytes_give_a_value_in_range_or_a_run_file_error(tmp_path: Path, name: str, data: bytes) -> None:
    place(tmp_path, name, data)
    read_or_refuse(tmp_path, name)


@pytest.mark.parametrize("name", sorted(READERS))
@PROPERTY
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.none() | st.floats(0, 1))
def test_damaged_copies_of_a_valid_file_give_a_value_in_range_or_a_run_file_error(
    tmp_path: Path, originals: dict[str, bytes], name: str, edits: list[tuple[float, int]], cut: Any
) -> None:
    data = bytearray(originals[name])
    for where, byte in edits:
        data[int(where * len(data))] = byte
    place(tmp_path, name, bytes(data[: int(cut * len(data))] if cut is not None else data))
    read_or_refuse(tmp_path, name)


@pytest.mark.parametrize("name", sorted(JSON_READERS))
@PROPERTY
@given(value=JSON_VALUES)
def test_any_json_value_gives_a_value_in_range_or_a_run_file_error(tmp_path: Path, name: str, value: Any) -> None:
    place(tmp_path, name, json.dumps(value).encode())
    read_or_refuse(tmp_path, name)


@pytest.mark.parametrize("name", sorted(JSON_READERS) + sorted(YAML_READERS))
@PROPERTY
@given(data=st.data())
def test_near_valid_records_give_a_value_in_range_or_a_run_file_error(
    tmp_path: Path, originals: dict[str, bytes], name: str, data: st.DataObject
) -> None:
    is_yaml = name in YAML_READERS
    original = yaml.safe_load(originals[name]) if is_yaml else json.loads(originals[name])
    record = original
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = paths_of(record)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        how = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]), label="how")
        record = mutate(record, path, how, data.draw(JSON_VALUES, label="value"))
    if is_yaml:
        try:
            text = yaml.safe_dump(record, allow_unicode=False)
        except yaml.YAMLError:
            text = json.dumps(record)  # JSON is YAML too, mostly
    else:
        text = json.dumps(record)
    place(tmp_path, name, text.encode("utf-8", "surrogatepass"))
    read_or_refuse(tmp_path, name)


ARRAYS = hnp.arrays(
    dtype=st.sampled_from(["uint8", "int8", "int64", "float32", "float64", "bool", "<U3", ">f4", "complex64"]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=12),
)


@PROPERTY
@given(replaced=st.dictionaries(st.sampled_from(sorted(prediction_members())), ARRAYS, max_size=3),
       dropped=st.sets(st.sampled_from(sorted(prediction_members())), max_size=1),
       extra=st.booleans(), compress=st.booleans())
def test_near_valid_predictions_give_arrays_in_range_or_a_run_file_error(
    tmp_path: Path, replaced: dict[str, np.ndarray], dropped: set[str], extra: bool, compress: bool
) -> None:
    members = {**prediction_members(), **replaced}
    files = {f"{k}.npy": npy(v) for k, v in members.items() if k not in dropped}
    if extra:
        files["extra.npy"] = npy(np.zeros(3))
    place(tmp_path, rundir.PREDICTIONS_FILE, npz_bytes(files, compress))
    read_or_refuse(tmp_path, rundir.PREDICTIONS_FILE)
