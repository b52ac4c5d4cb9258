"""MLflow tracking of the search against a real SQLite store, and with an unreachable server."""

from __future__ import annotations

import csv
import logging
import pickle
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("mlflow")
pytest.importorskip("ray")

from mlflow import MlflowClient  # noqa: E402

from eqlv2.losses.statistics import GradientStatistics  # noqa: E402
from eqlv2.search.mlflow_client import (  # noqa: E402
    PARENT_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    prepare_tracking_store,
    ui_command,
)
from eqlv2.search.mlflow_driver import SearchTracking, close_stale_child_runs  # noqa: E402
from eqlv2.search.mlflow_outbox import DurableMlflow  # noqa: E402
from eqlv2.search.mlflow_trial_run import TrialRunCreator, start_trial_run  # noqa: E402
from eqlv2.search.mlflow_worker import gradient_table, read_gradient_ratio  # noqa: E402
from eqlv2.search.optuna_study import TRIAL_NUMBER_KEY, TrialStateOptunaSearch  # noqa: E402
from eqlv2.search.plots import (  # noqa: E402
    frequency_order,
    gradient_ratio_figure,
    optuna_history_figure,
    optuna_importance_figure,
    save_figure,
    weight_norms_figure,
)
from eqlv2.search.settings import RUN_ID_KEY, TrialSettings, dataset_specs, parse_objective  # noqa: E402
from eqlv2.search.space import parse_search_space  # noqa: E402
from eqlv2.search.stores import sqlite_url  # noqa: E402


@pytest.fixture()
def store(tmp_path):
    uri = sqlite_url(tmp_path / "mlflow.db")
    experiment_id = prepare_tracking_store(uri, "test-search", tmp_path / "artifacts")
    return uri, experiment_id


def test_default_store_is_an_absolute_sqlite_file(tmp_path, store):
    uri, experiment_id = store
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert uri.startswith("sqlite:////")
    assert (tmp_path / "mlflow.db").is_file()
    assert ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"
    # Created once: preparing again returns the same experiment.
    assert prepare_tracking_store(uri, "test-search", tmp_path / "artifacts") == experiment_id
    location = MlflowClient(uri).get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "artifacts").resolve().as_uri()


def test_parent_and_child_runs_read_back(tmp_path, store):
    uri, experiment_id = store
    mlflow = DurableMlflow(uri, tmp_path / "outbox")
    parent = mlflow.create_run(experiment_id, "search", {"kind": "search"})
    child = mlflow.create_run(experiment_id, "trial", {PARENT_TAG: parent, TRIAL_TAG: "abc123", STATUS_TAG: "running"})
    stale = mlflow.create_run(experiment_id, "trial2", {PARENT_TAG: parent, TRIAL_TAG: "def456"})
    mlflow.log_params(child, {"gamma": 12.0, "mu": 0.8, "alpha": 4.0, "dataset": "lvis"})
    for step, value in ((10, 1.5), (20, 1.2)):
        mlflow.log_metrics(child, {"lvis/total_loss": value, "lvis/AP": float("nan"), "flag": True}, step)
    table = gradient_table(
        GradientStatistics(*(np.arange(3.0) + i for i in range(5))),
        {"names": ["a", "b", "c"], "counts": [30, 5, 1], "groups": ["f", "c", "r"]},
    )
    mlflow.log_text(child, table, "gradient_statistics/lvis/g.csv")
    mlflow.terminate(child, "FINISHED")

    client = MlflowClient(uri)
    run = client.get_run(child)
    assert run.data.tags[PARENT_TAG] == parent
    assert run.data.params == {"gamma": "12.0", "mu": "0.8", "alpha": "4.0", "dataset": "lvis"}
    history = client.get_metric_history(child, "lvis/total_loss")
    assert [(m.step, m.value) for m in history] == [(10, 1.5), (20, 1.2)]
    assert "lvis/AP" not in run.data.metrics  # NaN is not logged
    assert [a.path for a in client.list_artifacts(child, "gradient_statistics/lvis")] == ["gradient_statistics/lvis/g.csv"]
    assert [r.ref for r in mlflow.find_runs(experiment_id, {PARENT_TAG: parent, TRIAL_TAG: "abc123"})] == [child]

    assert close_stale_child_runs(mlflow, experiment_id, parent, "interrupted") == 1
    assert client.get_run(stale).info.status == "KILLED"
    assert client.get_run(stale).data.tags[STATUS_TAG] == "interrupted"
    assert client.get_run(child).info.status == "FINISHED"
    assert mlflow.pending() == 0


def test_one_batch_holds_metrics_params_and_tags(tmp_path, store):
    """``log_batch`` writes the finite metrics at their step, the params and the tags of one call
    (the driver's close: the objective and the trial's final tags); nothing stays in the outbox."""
    uri, experiment_id = store
    mlflow = DurableMlflow(uri, tmp_path / "outbox")
    run = mlflow.create_run(experiment_id, "trial")
    long_tag = "x" * 6000
    mlflow.log_batch(run, metrics={"objective": 21.5, "lvis/objective": float("nan")}, step=3, params={"alpha": 4.0}, tags={"error": long_tag})
    mlflow.log_batch(run)  # nothing to log: no request, no entry
    data = MlflowClient(uri).get_run(run).data
    assert data.metrics == {"objective": 21.5}
    assert [m.step for m in MlflowClient(uri).get_metric_history(run, "objective")] == [3]
    assert data.params == {"alpha": "4.0"}
    assert data.tags["error"] == "x" * 5000
    assert mlflow.pending() == 0


def test_deferred_points_go_out_with_the_runs_next_call_or_when_due(tmp_path, store):
    uri, experiment_id = store
    mlflow = DurableMlflow(uri, tmp_path / "outbox")
    run = mlflow.create_run(experiment_id, "trial")
    client = MlflowClient(uri)
    mlflow.defer_metrics(run, {"loss": 1.0, "AP": float("nan")}, 1, within=3600)
    mlflow.defer_metrics(run, {"loss": 0.5}, 2, within=3600)
    assert client.get_metric_history(run, "loss") == []
    mlflow.log_text(run, "table", "t.csv")  # the run's next call: the points go first
    assert [(m.step, m.value) for m in client.get_metric_history(run, "loss")] == [(1, 1.0), (2, 0.5)]
    mlflow.defer_metrics(run, {"loss": 0.25}, 3, within=3600)
    mlflow.defer_metrics(run, {"loss": 0.2}, 4, within=0.0)  # the oldest waited long enough
    assert [m.step for m in client.get_metric_history(run, "loss")] == [1, 2, 3, 4]
    mlflow.defer_metrics(run, {"loss": 0.1}, 5)
    mlflow.log_metrics(run, {"AP": 3.0}, 5)  # one batch with the deferred point
    mlflow.defer_metrics(run, {"loss": 0.05}, 6)
    mlflow.flush()
    assert [m.step for m in client.get_metric_history(run, "loss")] == [1, 2, 3, 4, 5, 6]
    assert "AP" in client.get_run(run).data.metrics and mlflow.pending() == 0


def test_rank0_hooks_send_every_point_before_each_evaluation_report(tmp_path, store):
    """The writer defers its points (logging period 2); the artifacts hook, built from the same
    unpickled factories, sends them right after each evaluation (period 5), where the search's
    report hook comes next; the rest go after training, each point once."""
    import torch
    from detectron2.config import CfgNode
    from detectron2.engine import EvalHook, HookBase, TrainerBase

    from eqlv2.search.trial import TrialRunHooks

    uri, experiment_id = store
    run = DurableMlflow(uri, tmp_path / "outbox").create_run(experiment_id, "trial")
    client = MlflowClient(uri)
    factories = pickle.loads(pickle.dumps(TrialRunHooks(uri, str(tmp_path / "results"), run, "lvis", period=2)))
    cfg = CfgNode({"SOLVER": {"MAX_ITER": 10}, "TEST": {"EVAL_PERIOD": 5}, "DATASETS": {"TRAIN": (), "TEST": ("val",)}})
    on_server: dict[int, list[int]] = {}

    class Loop(TrainerBase):
        model = torch.nn.Linear(2, 2)

        def run_step(self):
            self.storage.put_scalar("total_loss", 1.0 / (self.iter + 1))

    class ServerView(HookBase):  # where the report hook sits
        def after_step(self):
            done = self.trainer.iter + 1
            on_server[done] = [m.step for m in client.get_metric_history(run, "lvis/total_loss")]

    trainer = Loop()
    evaluation = EvalHook(5, lambda: {"bbox": {"AP": 10.0 + trainer.iter}})
    trainer.register_hooks([evaluation, factories.writer(cfg, trainer), factories.artifacts(cfg, trainer), ServerView()])
    trainer.train(0, 10)
    assert on_server[4] == [] and on_server[5] == [2, 4] and on_server[9] == [2, 4]
    assert [m.step for m in client.get_metric_history(run, "lvis/total_loss")] == [2, 4, 6, 8, 10]
    assert [(m.step, m.value) for m in client.get_metric_history(run, "lvis/bbox/AP")] == [(5, 14.0), (10, 20.0)]


def test_trial_folder_names_leave_out_the_mlflow_run_id():
    from ray.tune.experiment import Trial

    from eqlv2.search.driver import trial_dirname

    config = {"alpha": 4.123456, "gamma": 12.0, RUN_ID_KEY: "0123456789abcdef" * 2, TRIAL_NUMBER_KEY: 3}
    trial = Trial("run_trial", config=config, trial_id="a1b2c3d4", stub=True)
    assert trial_dirname(trial) == "run_trial_a1b2c3d4_alpha=4.1235,gamma=12,optuna_trial_number=3"


def test_resumed_trial_continues_its_own_run(tmp_path, store):
    """A search killed and resumed: its driver closes the trial's open run (KILLED), then the
    restarted trial (same Tune trial id) reopens that run instead of creating a second one."""
    uri, _ = store
    first_driver = SearchTracking.open(uri, "test-search", tmp_path / "artifacts", "s", None, tmp_path / "outbox")
    settings = TrialSettings(
        space=parse_search_space({"params": {"alpha": {"low": 0.0, "high": 8.0}}}), datasets=dataset_specs(["lvis"]),
        objective=parse_objective("AP"), tracking_uri=uri, experiment_id=first_driver.experiment_id,
        parent_run_id=first_driver.parent_run_id, mlflow_outbox=first_driver.outbox_root, search_name="s",
    )  # fmt: skip
    run_id = start_trial_run(settings, "t1", 0, {"alpha": 4.0})
    client = MlflowClient(uri)
    SearchTracking.open(uri, "test-search", tmp_path / "artifacts", "s", first_driver.parent_run_id, tmp_path / "outbox")
    assert (client.get_run(run_id).info.status, client.get_run(run_id).data.tags[STATUS_TAG]) == ("KILLED", "interrupted")
    resumed = replace(settings, resume=True)  # what the resumed search's driver gives its trials
    assert start_trial_run(resumed, "t1", 0, {"alpha": 4.0}) == run_id
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags[STATUS_TAG], run.data.params["alpha"]) == ("RUNNING", "running", "4.0")
    assert client.get_run(first_driver.parent_run_id).info.status == "RUNNING"
    assert start_trial_run(resumed, "t2", 1, {"alpha": 2.0}) != run_id  # another trial: its own run
    children = client.search_runs([settings.experiment_id], f"tags.`{PARENT_TAG}` = '{first_driver.parent_run_id}'")
    assert sorted(r.data.tags[TRIAL_TAG] for r in children) == ["t1", "t2"]


def test_driver_creates_a_suggested_trials_run_and_names_it_in_the_config(tmp_path, store):
    """The searcher's ``on_suggest`` (the driver's :class:`TrialRunCreator`) creates the run of
    each suggested trial, with the tags and params a trial would give it, and the trial's config
    names it; the creator survives pickling (Tune saves the searcher), and a failing one costs
    the trial only its run id (the trial then creates the run itself)."""
    import optuna

    uri, _ = store
    driver = SearchTracking.open(uri, "test-search", tmp_path / "artifacts", "s", None, tmp_path / "outbox")
    space = parse_search_space({"params": {"alpha": {"low": 0.0, "high": 8.0}}, "fixed": {"gamma": 12.0}})
    settings = TrialSettings(
        space=space, datasets=dataset_specs(["lvis"]), objective=parse_objective("AP"), tracking_uri=uri,
        experiment_id=driver.experiment_id, parent_run_id=driver.parent_run_id, mlflow_outbox=driver.outbox_root,
        search_name="s", seed=7, num_workers=2,
    )  # fmt: skip
    creator = pickle.loads(pickle.dumps(TrialRunCreator(settings)))
    storage = optuna.storages.RDBStorage(sqlite_url(tmp_path / "optuna.db"))
    searcher = TrialStateOptunaSearch(
        space.optuna_distributions(), "objective", "max", points_to_evaluate=[{"alpha": 4.0}],
        study_name="s", storage=storage, experiment="s", on_suggest=creator,
    )  # fmt: skip
    config = searcher.suggest("t1")
    run = MlflowClient(uri).get_run(config[RUN_ID_KEY])
    assert (config["alpha"], config[TRIAL_NUMBER_KEY], run.info.run_name) == (4.0, 0, "t1 (alpha=4, gamma=12)")
    assert run.info.status == "RUNNING"
    assert {k: run.data.tags[k] for k in (PARENT_TAG, TRIAL_TAG, STATUS_TAG, "optuna_trial_number", "trial_role")} == {
        PARENT_TAG: driver.parent_run_id, TRIAL_TAG: "t1", STATUS_TAG: "running", "optuna_trial_number": "0", "trial_role": "search",
    }  # fmt: skip
    assert {k: run.data.params[k] for k in ("alpha", "gamma", "seed", "num_workers", "datasets", "objective")} == {
        "alpha": "4.0", "gamma": "12.0", "seed": "7", "num_workers": "2", "datasets": "lvis", "objective": "AP",
    }  # fmt: skip

    def broken(trial_id, config):
        raise RuntimeError("server exploded")

    searcher = TrialStateOptunaSearch(
        space.optuna_distributions(), "objective", "max", study_name="s", storage=storage, experiment="s", on_suggest=broken
    )
    config = searcher.suggest("t2")
    assert RUN_ID_KEY not in config and config[TRIAL_NUMBER_KEY] == 1


def test_unreachable_server_only_warns(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    mlflow = DurableMlflow("http://127.0.0.1:9", tmp_path / "outbox", retry_after=60)  # nothing listens on port 9
    with caplog.at_level(logging.WARNING, logger="eqlv2.search.mlflow_outbox"):
        run = mlflow.create_run("0", "trial")
        mlflow.log_metrics(run, {"lvis/AP": 1.0}, step=5)  # journaled while the server is down
        mlflow.terminate(run, "FINISHED")
        assert mlflow.call("a read", lambda client: client.search_runs(["0"])) is None
    assert run.startswith("outbox-") and mlflow.pending() == 3
    assert not mlflow.available
    (found,) = mlflow.find_runs("0", {})  # known from the outbox, closed there
    assert (found.ref, found.open) == (run, False)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "unreachable" in messages and "calls are kept in" in messages


def test_plots_and_tables(tmp_path):
    counts = [5, 200, 40, 1]
    assert list(frequency_order(counts)) == [1, 2, 0, 3]
    ratio = save_figure(
        gradient_ratio_figure([0.2, 0.9, 0.5, 0.05], counts, groups=["r", "f", "c", "r"], baseline_ratio=[0.1, 0.8, 0.3, 0.01]),
        tmp_path / "ratio.png",
    )
    norms = save_figure(weight_norms_figure([1.0, 2.0, 1.5, 0.5], counts, groups=["r", "f", "c", "r"]), tmp_path / "norms.png")
    for path in (ratio, norms):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = tmp_path / "g.csv"
    table.write_text(
        gradient_table(
            GradientStatistics(*(np.array([1.0, 2.0]) for _ in range(5))),
            {"names": ["x", "y"], "counts": [3, 1], "groups": None},
        )
    )
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["category", "name", "group", "train_count", "pos_grad", "neg_grad", "ratio", "q", "r"]
    assert read_gradient_ratio(table) == [1.0, 2.0]


def test_optuna_plots(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    assert optuna_history_figure(study) is None  # nothing complete yet
    study.optimize(lambda t: t.suggest_float("gamma", 4, 16) - t.suggest_float("alpha", 0, 8) / 4, n_trials=6)
    assert save_figure(optuna_history_figure(study), tmp_path / "h.png").is_file()
    assert save_figure(optuna_importance_figure(study), tmp_path / "i.png").is_file()


def test_only_a_resumed_search_looks_for_an_earlier_attempt_of_a_trial(tmp_path):
    """A trial of a new search cannot have an earlier attempt, so it opens neither the Optuna
    study nor an MLflow search for one (0.7 CPU-s per trial on PostgreSQL); the same trial in a
    resumed search finds the study's record."""
    import optuna

    from eqlv2.search.optuna_study import RESULT_ATTR
    from eqlv2.search.trial import _already_finished

    url = sqlite_url(tmp_path / "optuna.db")
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    trial = study.ask()
    trial.set_user_attr(RESULT_ATTR, {"objective": 3.0})
    study.tell(trial, 3.0)
    settings = TrialSettings(
        space=parse_search_space({"params": {"alpha": {"low": 0.0, "high": 8.0}}}), datasets=dataset_specs(["lvis"]),
        objective=parse_objective("AP"), optuna_storage=url, study_name="s",
    )  # fmt: skip
    assert _already_finished(settings, 0) is None
    assert _already_finished(replace(settings, resume=True), 0) == {"state": "COMPLETE", "metrics": {"objective": 3.0}, "values": [3.0]}


@pytest.mark.parametrize("scale", [1.0, 12345.0])
def test_category_figures_keep_every_label_on_the_canvas(scale):
    """The per-category figures use fixed margins (no tight_layout pass): the title, axis labels,
    tick labels and legend must still lie inside the figure, for LVIS's 1,203 categories, the
    longest title a trial writes and values whose tick labels are wide."""
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 5000, 1203).astype(float)
    groups = ["f" if c > 3000 else "c" if c > 500 else "r" for c in counts]
    title = "openimages: pos/neg gradient ratio at iteration 1234567"
    figures = [
        gradient_ratio_figure(scale * rng.random(1203), counts, groups=groups, baseline_ratio=scale * rng.random(1203), title=title),
        weight_norms_figure(scale * rng.random(1203), counts, groups=groups, title="openimages: classifier weight norms of the final model"),
    ]  # fmt: skip
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for figure in figures:
        agg = FigureCanvasAgg(figure)
        agg.draw()  # as savefig draws it
        renderer, canvas = agg.get_renderer(), figure.bbox
        (ax,) = figure.axes
        ticks = [
            label for axis in (ax.xaxis, ax.yaxis) for at, label in zip(axis.get_ticklocs(), axis.get_ticklabels(), strict=True)
            if min(axis.get_view_interval()) <= at <= max(axis.get_view_interval())  # drawn ticks only
        ]  # fmt: skip
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label, *ticks, ax.get_legend()]
        for text in texts:
            box = text.get_window_extent(renderer)
            inside = box.x0 >= canvas.x0 and box.y0 >= canvas.y0 and box.x1 <= canvas.x1 and box.y1 <= canvas.y1
            label = getattr(text, "get_text", lambda: "legend")()
            assert inside or not label, f"{label!r} at {box.bounds} is outside the figure {canvas.bounds}"
