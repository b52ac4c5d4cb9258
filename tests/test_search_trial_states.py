"""One writer per record: a trial's final MLflow state, and the Ray resources of a stopped trial.

Real local Ray (Tune, Train V2), a real SQLite MLflow store read back with ``MlflowClient``.

* The race of issue 13, made to happen on purpose: trial processes that report to Tune and write
  their MLflow run (through the project's trial-side code: :func:`eqlv2.search.mlflow_trial_run.start_trial_run`
  and the rank-0 :class:`~eqlv2.search.mlflow_worker.MlflowEventWriter`) as fast as they can are
  stopped by Tune in the middle of that, or fail, several times over. The driver's
  :class:`~eqlv2.search.mlflow_driver.SearchTracking` alone writes each run's final state: every
  stopped trial ends ``KILLED``/``stopped_early`` without ``error.txt``, every failed one
  ``FAILED``/``failed`` with it.
* A trial that ASHA stops kills its Ray Train run (:func:`eqlv2.search.train_runner.fit_relayed`);
  Ray Train's own placement-group cleaner (served by the dashboard's State API, which the search
  starts) releases its workers' group, and Tune reuses the trial's process for the next trial.
"""

from __future__ import annotations

import functools
import os
import time

import pytest

pytest.importorskip("ray")
pytest.importorskip("optuna")
pytest.importorskip("mlflow")

import ray  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from ray import tune  # noqa: E402
from ray.train import RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402
from search_fixtures import ray_local  # noqa: E402,F401

from eqlv2.search.mlflow_client import PARENT_TAG, STATUS_TAG, TRIAL_TAG  # noqa: E402
from eqlv2.search.mlflow_driver import SearchTracking  # noqa: E402
from eqlv2.search.mlflow_outbox import DurableMlflow, node_outbox  # noqa: E402
from eqlv2.search.mlflow_trial_run import start_trial_run  # noqa: E402
from eqlv2.search.mlflow_worker import MlflowEventWriter  # noqa: E402
from eqlv2.search.optuna_study import STEP_KEY, build_scheduler  # noqa: E402
from eqlv2.search.settings import TrialSettings, dataset_specs, parse_objective  # noqa: E402
from eqlv2.search.space import parse_search_space  # noqa: E402
from eqlv2.search.train_runner import fit_relayed  # noqa: E402

SPACE = parse_search_space({"params": {"alpha": {"low": 0.0, "high": 8.0}}})
STOP_AT = 4  # Tune stops a trial once it has reported this many results


def reporting_trial(config, settings):
    """Writes its run and reports to Tune without pause until stopped; fails at its 4th report
    when ``config["fail"]``."""
    trial_id = tune.get_context().get_trial_id()
    run_id = start_trial_run(settings, trial_id, None, {"alpha": config["alpha"]})
    mlflow = DurableMlflow(settings.tracking_uri, node_outbox(settings.mlflow_outbox))
    writer = MlflowEventWriter(mlflow, run_id, "lvis", 10_000, (), defer_seconds=0.0)  # every point at once
    with EventStorage() as storage:
        for iteration in range(10_000):
            storage.iter = iteration
            storage.put_scalar("total_loss", 1.0 / (iteration + 1))
            writer.write()
            if config["fail"] and iteration == STOP_AT - 1:
                raise RuntimeError("simulated training failure")
            tune.report({"objective": float(iteration), STEP_KEY: iteration})


@pytest.mark.slow
def test_final_states_are_written_by_the_driver_alone(ray_local, tmp_path):  # noqa: F811
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = SearchTracking.open(uri, "race", tmp_path / "artifacts", "race", None, tmp_path / "mlflow_outbox")
    settings = TrialSettings(
        space=SPACE, datasets=dataset_specs(["lvis"]), objective=parse_objective("AP"), tracking_uri=uri,
        experiment_id=tracking.experiment_id, parent_run_id=tracking.parent_run_id, search_name="race",
        mlflow_outbox=tracking.outbox_root,
    )  # fmt: skip
    fails = [False, True, False, False, True, False, False, True]
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(reporting_trial, settings=settings), {"cpu": 1}),
        param_space={"fail": tune.grid_search(fails), "alpha": 1.0},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(
            name="race", storage_path=str(tmp_path / "ray"), callbacks=[tracking], verbose=0,
            stop={"training_iteration": STOP_AT},
        ),
    )  # fmt: skip
    results = tuner.fit()
    assert sorted(r.error is not None for r in results) == sorted(fails)
    time.sleep(3)  # anything a stopped trial process still had in flight has landed by now
    client = MlflowClient(uri)
    runs = tracking.mlflow.find_runs(tracking.experiment_id, {PARENT_TAG: tracking.parent_run_id})
    assert len(runs) == len(fails)
    failed_by_trial = {r.metrics["trial_id"]: r.error is not None for r in results}
    for run in runs:
        run = client.get_run(run.ref)
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        if failed_by_trial[run.data.tags[TRIAL_TAG]]:
            assert (run.info.status, run.data.tags[STATUS_TAG]) == ("FAILED", "failed")
            assert "error.txt" in files and "simulated training failure" in run.data.tags["error"]
        else:
            assert (run.info.status, run.data.tags[STATUS_TAG]) == ("KILLED", "stopped_early")
            assert "error.txt" not in files and "error" not in run.data.tags
        assert len(client.get_metric_history(run.info.run_id, "lvis/total_loss")) >= STOP_AT - 1


def _asha_trainer(value: float, storage: str, callbacks: list) -> TorchTrainer:
    """A Ray Train run of one worker that reports ``value`` at three evaluations."""

    def loop(loop_config):
        for step in (1, 2, 3):
            ray.train.report({"objective": loop_config["value"], STEP_KEY: step})
            time.sleep(0.5)

    return TorchTrainer(
        loop, train_loop_config={"value": value}, scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="train", storage_path=storage, callbacks=callbacks),
    )  # fmt: skip


def asha_trial(config):
    """The search's way to run Ray Train in a trial (:func:`fit_relayed`); every result names the
    trial process."""
    pid = os.getpid()
    make = functools.partial(_asha_trainer, config["value"], tune.get_context().get_trial_dir())
    fit_relayed(make, lambda metrics: {**metrics, "trial_pid": pid})


def _live_groups() -> list[dict]:
    return [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]


@pytest.mark.slow
def test_asha_stopped_trial_frees_its_group_and_its_process_is_reused(ray_local, tmp_path):  # noqa: F811
    """The second trial lags at its first evaluation: ASHA stops it, which kills its runner, hence
    its Ray Train controller, while the worker still trains. Tune gives its process to the third
    trial (``reuse_actors``): one trial process serves all three. No group stays reserved."""
    scheduler = build_scheduler("asha", total_evaluations=3, grace_period=1, reduction_factor=2)
    tuner = tune.Tuner(
        tune.with_resources(asha_trial, {"cpu": 0, "memory": 1}),
        param_space={"value": tune.grid_search([10.0, 1.0, 10.0])},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name="asha", storage_path=str(tmp_path / "ray"), verbose=0),
    )
    results = tuner.fit()
    assert [r.error for r in results] == [None, None, None]
    by_value = sorted((r.config["value"], r.metrics[STEP_KEY]) for r in results)
    assert by_value == [(1.0, 1), (10.0, 3), (10.0, 3)]  # the lagging one stopped at its first evaluation
    assert len({r.metrics["trial_pid"] for r in results}) == 1
    # Ray Train's cleaner is a detached actor polling the State API every second: on a loaded
    # 2-core machine its start and its first answers can take a minute or more.
    deadline = time.monotonic() + 240
    while _live_groups() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _live_groups() == []
