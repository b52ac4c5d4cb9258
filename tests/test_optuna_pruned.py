"""Trials stopped early are PRUNED in the Optuna study, errors FAIL, and resumes stay consistent.

A real local Ray Tune run with ASHA and a real SQLite Optuna study. The trainable is a stand-in for
training (its objective is a known function of alpha) so that ASHA's decision is deterministic:
the seed point alpha=4 completes first with objective 10 at every evaluation; alpha=0.5 reports
6.5 at its first evaluation, below the rung's cutoff (10), so ASHA stops it there.
"""

from __future__ import annotations

import math
import pickle

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("ray")

from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.search import ConcurrencyLimiter  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402
from search_fixtures import ray_local  # noqa: E402,F401

from eqlv2.search.optuna_study import (  # noqa: E402
    COMPLETION_KEY,
    EXPERIMENT_ATTR,
    REASON_ATTR,
    STEP_KEY,
    TRIAL_NUMBER_KEY,
    TrialStateOptunaSearch,
    build_scheduler,
    finished_trial_summary,
    open_storage,
    pending_seed_points,
)
from eqlv2.search.space import parse_search_space  # noqa: E402
from eqlv2.search.stores import store_url  # noqa: E402

SPACE = parse_search_space({"params": {"alpha": {"low": 0.0, "high": 8.0}}})


def fake_training(config):
    """Three evaluations of objective 10 - |alpha - 4|; alpha > 6.5 crashes; alpha = 3 leads until
    its last evaluation, where it falls to 1."""
    alpha = config["alpha"]
    if alpha > 6.5:
        raise RuntimeError("simulated training crash")
    values = [10.0 - abs(alpha - 4.0)] * 3
    if alpha == 3.0:
        values = [10.5, 10.5, 1.0]
    for step, value in enumerate(values, start=1):
        tune.report({"objective": value, STEP_KEY: step})
    tune.report({"objective": values[-1], STEP_KEY: 3, COMPLETION_KEY: 1})


def _run(searcher, tmp_path, name, num_samples):
    scheduler = build_scheduler("asha", total_evaluations=3, grace_period=1, reduction_factor=2)
    tuner = tune.Tuner(
        fake_training,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=1), scheduler=scheduler, num_samples=num_samples
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path / "ray"), verbose=0),
    )
    return tuner.fit()


def _study(tmp_path, name):
    url = store_url(None, tmp_path / "optuna.db")
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    return url, storage, study


@pytest.mark.slow
def test_stopped_trial_is_pruned_and_error_fails(ray_local, tmp_path):  # noqa: F811
    url, storage, study = _study(tmp_path, "fixed")
    seeds = pending_seed_points(study, [{"alpha": 4.0}, {"alpha": 0.5}, {"alpha": 7.0}, {"alpha": 3.0}])
    searcher = TrialStateOptunaSearch(
        SPACE.optuna_distributions(), "objective", "max", points_to_evaluate=seeds,
        study_name="fixed", storage=storage, experiment="exp-fixed", record_keys=["objective"],
    )  # fmt: skip
    results = _run(searcher, tmp_path, "fixed", 4)
    assert len(results) == 4

    trials = optuna.load_study(study_name="fixed", storage=url).trials
    by_alpha = {round(t.params["alpha"], 3): t for t in trials}
    complete, stopped, crashed, late = by_alpha[4.0], by_alpha[0.5], by_alpha[7.0], by_alpha[3.0]
    assert complete.state == TrialState.COMPLETE and complete.value == 10.0
    assert complete.intermediate_values == {1: 10.0, 2: 10.0, 3: 10.0}
    # Stopped by ASHA at its first evaluation: pruned, its value the last intermediate one.
    assert stopped.state == TrialState.PRUNED
    assert stopped.intermediate_values == {1: 6.5}
    assert stopped.value == 6.5
    assert crashed.state == TrialState.FAIL and crashed.value is None
    # Worse than the rung only at its last evaluation: nothing to save by stopping it, so it
    # completes with its true final value.
    assert late.state == TrialState.COMPLETE and late.value == 1.0
    assert "error" in crashed.user_attrs[REASON_ATTR]
    assert all(t.user_attrs[EXPERIMENT_ATTR] == "exp-fixed" for t in trials)
    # A second search on the same study does not queue the seed points it holds again; a failed
    # one may be tried again.
    assert pending_seed_points(optuna.load_study(study_name="fixed", storage=url), seeds) == [{"alpha": 7.0}]
    assert finished_trial_summary(study, complete.number)["metrics"] == {"objective": 10.0}


@pytest.mark.slow
def test_upstream_optuna_search_records_stopped_trial_as_complete(ray_local, tmp_path):  # noqa: F811
    """The bug being worked around: ray 2.60's OptunaSearch tells COMPLETE with a truncated value.

    If this starts failing, Ray fixed it upstream and TrialStateOptunaSearch may be simplified.
    """
    url, storage, _ = _study(tmp_path, "upstream")
    searcher = OptunaSearch(
        SPACE.optuna_distributions(), metric="objective", mode="max",
        points_to_evaluate=[{"alpha": 4.0}, {"alpha": 0.5}], study_name="upstream", storage=storage,
    )  # fmt: skip
    _run(searcher, tmp_path, "upstream", 2)  # (NaN-aware ASHA, same decision as Ray's here)
    stopped = [t for t in optuna.load_study(study_name="upstream", storage=url).trials if t.params["alpha"] == 0.5]
    assert stopped[0].state == TrialState.COMPLETE and stopped[0].value == 6.5


def test_non_finite_final_objective_fails_and_restore_fails_orphans(tmp_path):
    url, storage, study = _study(tmp_path, "direct")
    searcher = TrialStateOptunaSearch(
        SPACE.optuna_distributions(), "objective", "max", points_to_evaluate=[{"alpha": 1.0}],
        study_name="direct", storage=storage, experiment="exp-direct",
    )  # fmt: skip
    config = searcher.suggest("t-nan")
    assert config["alpha"] == 1.0 and config[TRIAL_NUMBER_KEY] == 0
    searcher.on_trial_result("t-nan", {"objective": 3.0, STEP_KEY: 1})
    searcher.on_trial_result("t-nan", {"objective": 3.5, STEP_KEY: 1})  # same evaluation: ignored
    searcher.on_trial_complete("t-nan", {"objective": math.nan, STEP_KEY: 2, COMPLETION_KEY: 1})
    searcher.suggest("t-live")
    checkpoint = tmp_path / "searcher.pkl"
    searcher.save(str(checkpoint))
    # Asked after the checkpoint, then the driver died: nothing will ever tell this trial.
    searcher.suggest("t-orphan")

    restored = TrialStateOptunaSearch(
        SPACE.optuna_distributions(), "objective", "max", study_name="direct", storage=storage, experiment="exp-direct"
    )
    restored.restore(str(checkpoint))
    states = {t.user_attrs["tune_trial_id"]: t for t in optuna.load_study(study_name="direct", storage=url).trials}
    assert states["t-nan"].state == TrialState.FAIL
    assert states["t-nan"].intermediate_values == {1: 3.0}
    assert "non-finite" in states["t-nan"].user_attrs[REASON_ATTR]
    assert states["t-live"].state == TrialState.RUNNING  # the restored search still owns it
    assert states["t-orphan"].state == TrialState.FAIL
    # The restored searcher finishes its live trial normally.
    restored.on_trial_complete("t-live", {"objective": 7.0, STEP_KEY: 3, COMPLETION_KEY: 1})
    live = optuna.load_study(study_name="direct", storage=url).trials[states["t-live"].number]
    assert live.state == TrialState.COMPLETE and live.value == 7.0
    pickle.dumps(restored)  # Tune checkpoints the searcher by pickling it


def test_multi_objective_trials(tmp_path):
    """One objective per dataset: complete trials get both values, stopped ones are pruned."""
    url, storage, _ = _study(tmp_path, "unused")
    study = optuna.create_study(storage=storage, study_name="mo", directions=["maximize", "maximize"])
    searcher = TrialStateOptunaSearch(
        SPACE.optuna_distributions(), ["lvis/objective", "openimages/objective"], ["max", "max"],
        points_to_evaluate=[{"alpha": 4.0}], study_name="mo", storage=storage, experiment="exp-mo",
    )  # fmt: skip
    searcher.suggest("a")
    searcher.on_trial_result("a", {"lvis/objective": 1.0, "openimages/objective": 2.0, STEP_KEY: 1})
    searcher.on_trial_complete("a", {"lvis/objective": 3.0, "openimages/objective": 4.0, COMPLETION_KEY: 1})
    searcher.suggest("b")
    searcher.on_trial_complete("b", {"lvis/objective": 0.5, "openimages/objective": math.nan, STEP_KEY: 1})
    done, stopped = optuna.load_study(study_name="mo", storage=url).trials
    assert done.state == TrialState.COMPLETE and done.values == [3.0, 4.0]
    assert stopped.state == TrialState.PRUNED
    assert [t.number for t in study.best_trials] == [0]
