"""The points a search submission checks and binds (I2), in-process and exact.

A search binds every point it checked before queueing (:func:`mnist_hpc.search.search_points`)
to that point's identity (:func:`mnist_hpc.search.trial_identity`), by its label
(:func:`mnist_hpc.search.point_label`); a continued search is refused when one of them changed
(:meth:`SearchSpec.differences`). The mutation run found these had no fast test of their own:
each assertion here pins one value that a wrong boundary would change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from mnist_hpc.search import SearchSpec, point_label, search_points, trial_identity  # noqa: E402

SHA = "b" * 64


def spec(params: dict[str, str], enqueue: list[dict] | None = None, **kw) -> SearchSpec:
    return SearchSpec(study_name="s", direction="maximize", n_trials=4, params=params, enqueue=enqueue or [], **kw)


def test_the_points_are_the_first_values_then_each_choice_and_bound_alone():
    points = search_points(spec({"optimizer": "choice(rmsprop,adam,sgd)", "train.batch_size": "range(32, 256)",
                                 "optimizer.learning_rate": "tag(log, interval(1e-4, 1e-2))"}))
    first = {"optimizer": "rmsprop", "train.batch_size": 32, "optimizer.learning_rate": 1e-4}
    assert points[0] == first
    assert points[1:] == [
        dict(first, optimizer="rmsprop"), dict(first, optimizer="adam"), dict(first, optimizer="sgd"),
        # A range's upper end is excluded (Hydra's range): the highest value checked is 255.
        dict(first, **{"train.batch_size": 32}), dict(first, **{"train.batch_size": 255}),
        dict(first, **{"optimizer.learning_rate": 1e-4}), dict(first, **{"optimizer.learning_rate": 1e-2}),
    ]


def test_queued_sets_replace_the_first_point_and_fill_in_from_it():
    points = search_points(spec({"a": "choice(1,2)", "b": "choice(x,y)"}, enqueue=[{"a": 2}, {"b": "y", "a": 1}]))
    assert points[:2] == [{"a": 2, "b": "x"}, {"a": 1, "b": "y"}]
    assert points[2:] == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}, {"a": 1, "b": "x"}, {"a": 1, "b": "y"}]


def test_a_fixed_value_in_params_is_no_point_of_its_own():
    assert search_points(spec({"a": "choice(1,2)", "train.epochs": "3"})) == [{"a": 1}, {"a": 1}, {"a": 2}]


def test_a_label_names_every_key_in_order_with_its_value():
    assert point_label({"b": 2, "a": "x", "c": 0.5}) == "a=x b=2 c=0.5"
    assert point_label({}) == ""


def test_a_trials_identity_keeps_epochs_and_data_and_drops_only_the_searched_keys():
    flat = {"train.seed": 3, "train.epochs": 7, "optimizer.learning_rate": 0.01, "model.units": 512,
            "train.batch_size": 128}
    got = trial_identity(flat, SHA, spec({"optimizer.learning_rate": "interval(1e-4, 1e-2)"}))
    assert got == {"data.sha256": SHA, "model.units": 512, "train.batch_size": 128, "train.epochs": 7, "train.seed": 3}
    assert list(got) == sorted(got)
    # A searched config group is no config key: the keys it decides stay bound.
    group = trial_identity(flat, SHA, spec({"optimizer": "choice(rmsprop,adam)"}))
    assert group["optimizer.learning_rate"] == 0.01 and group["train.epochs"] == 7


def test_a_changed_point_identity_is_named_with_its_point_once():
    base = {"train.seed": 0, "data.sha256": SHA}
    old = spec({"optimizer": "choice(rmsprop,adam)"}, identity=dict(base),
               point_identities={"optimizer=rmsprop": dict(base, momentum=0.0), "optimizer=adam": dict(base, beta=0.9)})
    assert old.differences(old) == []
    changed = dataclasses.replace(old, point_identities={"optimizer=rmsprop": dict(base, momentum=0.0),
                                                         "optimizer=adam": dict(base, beta=0.99)})
    assert changed.differences(old) == ["with optimizer=adam: beta: 0.9 -> 0.99"]
    # A point that appears or disappears is named by its keys.
    gone = dataclasses.replace(old, point_identities={"optimizer=rmsprop": dict(base, momentum=0.0)})
    assert gone.differences(old) == [
        "with optimizer=adam: beta: 0.9 -> '(unset)'", "with optimizer=adam: data.sha256: " + repr(SHA) + " -> '(unset)'",
        "with optimizer=adam: train.seed: 0 -> '(unset)'"]
    assert old.differences(gone) == [
        "with optimizer=adam: beta: '(unset)' -> 0.9", "with optimizer=adam: data.sha256: '(unset)' -> " + repr(SHA),
        "with optimizer=adam: train.seed: '(unset)' -> 0"]
    # A change of the shared identity is said once, not again for every point that shows it.
    moved = dataclasses.replace(old, identity=dict(base, **{"train.seed": 1}),
                                point_identities={k: dict(v, **{"train.seed": 1}) for k, v in old.point_identities.items()})
    assert moved.differences(old) == ["train.seed: 0 -> 1"]


# --- what a search directory may hold ---------------------------------------------------------------


def test_a_search_directory_holds_only_its_own_numbered_trials(tmp_path: Path) -> None:
    from mnist_hpc.login.launcher.search import foreign_runs_problem
    from tests.helpers import hydra_trial_dir

    search_dir = tmp_path / "search"
    search_dir.mkdir()
    assert foreign_runs_problem(search_dir) is None
    hydra_trial_dir(search_dir / "3", ["optimizer.learning_rate=0.001"])  # a study's trial
    assert foreign_runs_problem(search_dir) is None
    hydra_trial_dir(search_dir / "lr" / "0", ["train.seed=0"])  # a plain sweep's, by hydra.sweep.subdir
    problem = foreign_runs_problem(search_dir)
    assert problem is not None and "lr/0" in problem and "new hydra.sweep.dir" in problem
    assert "run directory" in (foreign_runs_problem(search_dir / "3") or "")  # a trial is no search directory
    inner = search_dir / "3" / "nested"
    inner.mkdir()
    assert "inside the run directory" in (foreign_runs_problem(inner) or "")
