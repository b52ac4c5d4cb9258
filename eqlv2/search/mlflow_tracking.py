"""MLflow tracking of a search: the store, parent and child runs, and the rank-0 training hook.

Layout of one search in MLflow (experiment ``eqlv2-search`` by default):

* one **parent run** per search: the search space, the settings, and at the end the ranked table,
  the best configuration, Optuna's parameter-importance plot and optimisation history;
* one **child run** per trial attempt (tag ``mlflow.parentRunId``): params ``gamma``, ``mu``,
  ``alpha``, ``dataset(s)``, ``config``, ``seed``; tags ``tune_trial_id``, ``trial_status``;
  metrics ``<dataset>/<name>`` over iterations (losses, ``lr``, every evaluation metric, the
  gradient-statistics summaries per frequency group), written by :class:`MlflowTrainingHook` on
  rank 0; artifacts ``gradient_statistics/<dataset>/iter_XXXXXXX.csv`` (per-category accumulated
  positive / negative gradients, their ratio, q and r at each evaluation) with the matching ratio
  plot, and ``weight_norms/<dataset>.png`` / ``.csv`` for the final model.

Every call goes through :class:`SafeMlflow`, which never raises: when the tracking store is
unreachable, training and the search go on and a warning says what was not logged.

The default store is a SQLite file whose absolute path the driver fixes; the driver creates the
database once (:func:`prepare_tracking_store`) before any trial starts, because two processes
creating a new SQLite MLflow database at once crash.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detectron2.engine import HookBase
from ray.tune import Callback

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "MlflowHookFactory",
    "MlflowTrainingHook",
    "SafeMlflow",
    "TrialRunsCallback",
    "close_stale_child_runs",
    "default_tracking_uri",
    "find_child_runs",
    "prepare_tracking_store",
    "ui_command",
]

#: MLflow experiment of the searches unless ``--mlflow-experiment`` says otherwise.
DEFAULT_EXPERIMENT = "eqlv2-search"
#: Tags of the child runs.
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "tune_trial_id"
STATUS_TAG = "trial_status"
SEARCH_TAG = "search_name"


def default_tracking_uri(results_dir: str | os.PathLike) -> str:
    """``sqlite:////abs/path/mlflow.db`` in ``results_dir``."""
    path = Path(results_dir).expanduser().resolve() / "mlflow.db"
    return f"sqlite:///{path}"


def is_local_uri(uri: str) -> bool:
    """Whether ``uri`` is a store on this machine's file system (SQLite or a folder)."""
    return uri.startswith("sqlite") or uri.startswith("file:") or "://" not in uri


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this tracking store."""
    if uri.startswith("http://") or uri.startswith("https://"):
        return f"open {uri} in a browser (the tracking server's own UI)"
    return f"mlflow ui --backend-store-uri {uri}"


def prepare_tracking_store(uri: str, experiment: str, artifact_root: str | os.PathLike | None) -> str:
    """Creates the tracking database (once, here) and the experiment; returns its id.

    Args:
        uri: the tracking URI.
        experiment: experiment name.
        artifact_root: folder for the artifacts of a local store (absolute, so that Ray workers
            with another working directory write to the same place); None lets the server decide.

    Raises:
        Exception: whatever MLflow raises when the store is unreachable: the driver does not
            start a search it cannot track (later failures only warn).
    """
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None
    if artifact_root is not None and is_local_uri(uri):
        root = Path(artifact_root).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    return client.create_experiment(experiment, artifact_location=location)


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


class SafeMlflow:
    """An ``MlflowClient`` whose calls never raise.

    A failed call is logged as a warning naming what was not logged; after a failure, calls are
    skipped (and counted) for ``retry_after`` seconds so that an unreachable server does not stall
    training with its retries; then the next call tries again.
    """

    def __init__(self, tracking_uri: str, retry_after: float = 30.0) -> None:
        self.tracking_uri = tracking_uri
        self.retry_after = retry_after
        self._client = None
        self._down_since: float | None = None
        self._lock = threading.Lock()
        #: what was not logged: description → number of calls.
        self.dropped: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_client=None, _lock=None, _down_since=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self):
        """The underlying ``MlflowClient`` (created on first use)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def available(self) -> bool:
        """False while calls are being skipped after a failure."""
        return self._down_since is None or time.monotonic() - self._down_since >= self.retry_after

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(client, *args, **kwargs)``, or None (and a warning) if MLflow fails."""
        with self._lock:
            if not self.available:
                self.dropped[what] = self.dropped.get(what, 0) + 1
                return None
            try:
                result = fn(self.client, *args, **kwargs)
            except Exception as error:
                self.dropped[what] = self.dropped.get(what, 0) + 1
                self._down_since = time.monotonic()
                logger.warning(
                    "MLflow at %s failed; not logged: %s (%s: %s). Results stay in the Ray Tune "
                    "results and the Optuna study; MLflow calls pause for %.0f s.",
                    self.tracking_uri,
                    what,
                    type(error).__name__,
                    str(error).splitlines()[0][:300] if str(error) else "",
                    self.retry_after,
                )
                return None
            if self._down_since is not None:
                logger.warning("MLflow at %s reachable again", self.tracking_uri)
                self._down_since = None
            return result

    # --- conveniences -------------------------------------------------------------------------

    def create_run(
        self, experiment_id: str, run_name: str, tags: Mapping[str, str] | None = None
    ) -> str | None:
        """Creates a RUNNING run; returns its id or None."""
        run = self.call(
            f"new run {run_name!r}",
            lambda c: c.create_run(experiment_id, run_name=run_name, tags=dict(tags or {})),
        )
        return run.info.run_id if run is not None else None

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, Any], step: int) -> None:
        """Logs the finite numeric entries of ``metrics`` at ``step``."""
        from mlflow.entities import Metric

        values = _finite_metrics(metrics)
        if not run_id or not values:
            return
        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, int(step)) for key, value in values.items()]
        for start in range(0, len(batch), 900):  # MLflow accepts at most 1000 metrics per batch
            self.call(
                f"{len(batch)} metrics at step {step} of run {run_id}",
                lambda c, part=batch[start : start + 900]: c.log_batch(run_id, metrics=part),
            )

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        """Logs params (values as text, cut to MLflow's limit)."""
        from mlflow.entities import Param

        if not run_id or not params:
            return
        batch = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        self.call(f"params {sorted(params)} of run {run_id}", lambda c: c.log_batch(run_id, params=batch))

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        """Sets tags (values as text)."""
        from mlflow.entities import RunTag

        if not run_id or not tags:
            return
        batch = [RunTag(str(k), str(v)[:5000]) for k, v in tags.items()]
        self.call(f"tags {sorted(tags)} of run {run_id}", lambda c: c.log_batch(run_id, tags=batch))

    def log_artifact(self, run_id: str | None, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Uploads one file."""
        if not run_id:
            return
        self.call(
            f"artifact {Path(path).name} of run {run_id}",
            lambda c: c.log_artifact(run_id, str(path), artifact_path),
        )

    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        """Uploads ``text`` as the artifact ``artifact_file``."""
        if not run_id:
            return
        self.call(f"artifact {artifact_file} of run {run_id}", lambda c: c.log_text(run_id, text, artifact_file))

    def terminate(self, run_id: str | None, status: str) -> None:
        """Closes a run with ``status`` (FINISHED, FAILED or KILLED)."""
        if not run_id:
            return
        self.call(f"status {status} of run {run_id}", lambda c: c.set_terminated(run_id, status))

    def warn_dropped(self, context: str) -> None:
        """One warning summarising everything that was not logged."""
        if self.dropped:
            total = sum(self.dropped.values())
            examples = "; ".join(list(self.dropped)[:5])
            logger.warning(
                "%s: %d MLflow call(s) were not logged (e.g. %s). The Ray Tune results and the "
                "Optuna study hold the trial results.",
                context,
                total,
                examples,
            )


def find_child_runs(mlflow: SafeMlflow, experiment_id: str, parent_id: str, trial_id: str | None = None) -> list:
    """Child runs of ``parent_id`` (of one Tune trial if ``trial_id``), newest first; [] on failure."""
    query = f"tags.`{PARENT_TAG}` = '{parent_id}'"
    if trial_id:
        query += f" and tags.{TRIAL_TAG} = '{trial_id}'"
    runs = mlflow.call(
        f"search of the child runs of {parent_id}",
        lambda c: c.search_runs(
            [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1000
        ),
    )
    return list(runs or [])


# --- the rank-0 detectron2 hook -------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowHookFactory:
    """Picklable ``(cfg, trainer) -> hook`` for ``build_torch_trainer(extra_hooks=...)``.

    Attributes:
        tracking_uri: the MLflow tracking URI (absolute for SQLite).
        run_id: the trial's child run.
        dataset: short dataset name (``lvis``, ``openimages``): the metric prefix.
        period: iterations between two logs of the training scalars.
        baseline_ratio: ``(C,)`` gradient ratio of a baseline model for the plots, or None.
    """

    tracking_uri: str
    run_id: str
    dataset: str
    period: int = 20
    baseline_ratio: tuple[float, ...] | None = None

    def __call__(self, cfg, trainer) -> MlflowTrainingHook:
        return MlflowTrainingHook(
            SafeMlflow(self.tracking_uri),
            self.run_id,
            self.dataset,
            period=self.period,
            train_dataset=cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None,
            baseline_ratio=self.baseline_ratio,
        )


def _category_table(dataset_name: str | None, num_classes: int) -> dict[str, list]:
    """Names, training counts and frequency groups of the categories of ``dataset_name``."""
    names = [str(i) for i in range(num_classes)]
    counts: list[float] = [0.0] * num_classes
    groups: list[str] | None = None
    if dataset_name:
        try:
            from eqlv2.data import category_statistics

            stats = category_statistics(dataset_name)
            if len(stats.image_counts) == num_classes:
                names = list(stats.class_names)
                source = stats.instance_counts if stats.instance_counts is not None else stats.image_counts
                counts = [float(v) for v in source]
                groups = list(stats.frequency_groups)
        except Exception as error:  # statistics are a nicety of the plots, never fatal
            logger.warning("No category statistics for %s: %s", dataset_name, error)
    return {"names": names, "counts": counts, "groups": groups}


class MlflowTrainingHook(HookBase):
    """Logs a trial's training to its child run, from rank 0.

    * every ``period`` iterations: the scalars of that iteration in detectron2's ``EventStorage``
      (losses, ``lr``, ``eqlv2/...`` summaries), as ``<dataset>/<name>``;
    * after every evaluation (periodic and final): the flat evaluation summary (``AP``, ``APr``,
      ...), the gradient statistics as a CSV table and a ratio plot, and their per-group summaries;
    * after training: the classifier weight-norm plot and table of the final model.
    """

    def __init__(
        self,
        mlflow: SafeMlflow,
        run_id: str,
        dataset: str,
        *,
        period: int = 20,
        train_dataset: str | None = None,
        baseline_ratio: Sequence[float] | None = None,
    ) -> None:
        self._mlflow = mlflow
        self._run_id = run_id
        self._prefix = f"{dataset}/"
        self._dataset = dataset
        self._period = max(1, int(period))
        self._train_dataset = train_dataset
        self._baseline = baseline_ratio
        self._seen_eval: int | None = None
        self._categories: dict[str, list] | None = None

    # -- helpers ---------------------------------------------------------------------------------

    def _step(self) -> int:
        # Iterations done; after training detectron2 leaves ``iter`` at ``max_iter``.
        return min(int(self.trainer.iter) + 1, int(self.trainer.max_iter))

    def _categories_for(self, num_classes: int) -> dict[str, list]:
        if self._categories is None or len(self._categories["names"]) != num_classes:
            self._categories = _category_table(self._train_dataset, num_classes)
        return self._categories

    def _log_storage_scalars(self, step: int) -> None:
        from detectron2.utils.events import get_event_storage

        try:
            storage = get_event_storage()
        except (AssertionError, AttributeError):
            return
        current = {
            name: value
            for name, (value, iteration) in storage.latest().items()
            if iteration == step - 1 or iteration == step
        }
        self._mlflow.log_metrics(self._run_id, {self._prefix + k: v for k, v in current.items()}, step)

    def _maybe_log_evaluation(self) -> None:
        results = getattr(self.trainer, "_last_eval_results", None)
        if not results or id(results) == self._seen_eval:
            return
        self._seen_eval = id(results)
        step = self._step()
        try:
            # The same flat metrics rank 0 reports to Ray Train (hence to Tune): detectron2's
            # results flattened (bbox/AP, ...) and the paper's columns (AP, APr, ... / AP1..AP5).
            from eqlv2.cluster.reporting import evaluation_metrics

            flat = evaluation_metrics(results)
        except Exception as error:
            logger.warning("Could not summarise evaluation results for MLflow: %s", error)
            flat = {}
        self._mlflow.log_metrics(self._run_id, {self._prefix + k: v for k, v in flat.items()}, step)
        self._log_gradient_statistics(step)

    def _log_gradient_statistics(self, step: int) -> None:
        from eqlv2.statistics import summarize

        tracker = getattr(self.trainer, "gradient_statistics", None)
        if tracker is None:
            return
        try:
            snapshots = tracker.snapshots()
        except Exception as error:
            logger.warning("Could not read the gradient statistics: %s", error)
            return
        for stage, stats in enumerate(snapshots):
            suffix = "" if len(snapshots) == 1 else f"_stage{stage}"
            categories = self._categories_for(len(stats.ratio))
            groups = categories["groups"]
            metrics = summarize(stats, groups, prefix=f"{self._prefix}grad/")
            self._mlflow.log_metrics(self._run_id, metrics, step)
            with tempfile.TemporaryDirectory() as tmp:
                table = Path(tmp) / f"iter_{step:07d}{suffix}.csv"
                write_gradient_table(table, stats, categories)
                plot = Path(tmp) / f"ratio_iter_{step:07d}{suffix}.png"
                try:
                    from .plots import plot_gradient_ratio

                    plot_gradient_ratio(
                        stats.ratio,
                        categories["counts"],
                        plot,
                        groups=groups,
                        baseline_ratio=self._baseline,
                        title=f"{self._dataset}: pos/neg gradient ratio at iteration {step}",
                    )
                except Exception as error:
                    logger.warning("Could not plot the gradient ratio: %s", error)
                folder = f"gradient_statistics/{self._dataset}"
                self._mlflow.log_artifact(self._run_id, table, folder)
                if plot.exists():
                    self._mlflow.log_artifact(self._run_id, plot, folder)

    def _log_weight_norms(self) -> None:
        norms = classifier_weight_norms(self.trainer.model)
        if norms is None:
            return
        categories = self._categories_for(len(norms))
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / f"{self._dataset}.csv"
            with open(table, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["category", "name", "group", "train_count", "weight_norm"])
                groups = categories["groups"] or [""] * len(norms)
                for index, norm in enumerate(norms):
                    writer.writerow(
                        [index, categories["names"][index], groups[index], categories["counts"][index], f"{norm:.6g}"]
                    )
            plot = Path(tmp) / f"{self._dataset}.png"
            try:
                from .plots import plot_weight_norms

                plot_weight_norms(
                    norms,
                    categories["counts"],
                    plot,
                    groups=categories["groups"],
                    title=f"{self._dataset}: classifier weight norms of the final model",
                )
            except Exception as error:
                logger.warning("Could not plot the weight norms: %s", error)
            self._mlflow.log_artifact(self._run_id, table, "weight_norms")
            if plot.exists():
                self._mlflow.log_artifact(self._run_id, plot, "weight_norms")

    # -- detectron2 hook interface ---------------------------------------------------------------

    def after_step(self) -> None:
        step = self._step()
        try:
            if step % self._period == 0 or step == self.trainer.max_iter:
                self._log_storage_scalars(step)
            self._maybe_log_evaluation()
        except Exception:  # never let tracking break training
            logger.warning("MLflow hook failed at iteration %d:\n%s", step, traceback.format_exc())

    def after_train(self) -> None:
        try:
            self._maybe_log_evaluation()
            if int(self.trainer.iter) + 1 >= int(self.trainer.max_iter):
                self._log_weight_norms()
        except Exception:
            logger.warning("MLflow hook failed after training:\n%s", traceback.format_exc())
        self._mlflow.warn_dropped(f"trial run {self._run_id} ({self._dataset})")


def write_gradient_table(path: Path, stats, categories: Mapping[str, Any]) -> Path:
    """CSV of the per-category accumulated gradients, ratio, q and r (one row per category)."""
    columns = stats.as_columns()
    groups = categories.get("groups") or [""] * len(stats.ratio)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", "name", "group", "train_count", *columns])
        for index in range(len(stats.ratio)):
            writer.writerow(
                [
                    index,
                    categories["names"][index],
                    groups[index],
                    categories["counts"][index],
                    *(f"{float(values[index]):.6g}" for values in columns.values()),
                ]
            )
    return path


def read_gradient_ratio(path: str | os.PathLike) -> list[float]:
    """The ``ratio`` column of a gradient-statistics CSV (e.g. a baseline's, for the plots)."""
    with open(path, newline="") as handle:
        return [float(row["ratio"]) for row in csv.DictReader(handle)]


def classifier_weight_norms(model) -> list[float] | None:
    """L2 norms of the C category rows of the (last) box classifier, or None if there is none."""
    from eqlv2.modeling import EQLv2FastRCNNOutputLayers

    module = getattr(model, "module", model)
    predictors = [m for m in module.modules() if isinstance(m, EQLv2FastRCNNOutputLayers)]
    if not predictors:
        return None
    predictor = predictors[-1]
    weight = predictor.cls_score.weight.detach().float().cpu()
    return [float(v) for v in weight[: predictor.num_classes].norm(dim=1)]


# --- the driver side: closing the runs of finished trials ----------------------------------------


def _error_text(trial) -> str:
    try:
        error = trial.get_error()
    except Exception:  # older or newer Trial APIs
        error = None
    if error is not None:
        return str(error)
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()[-20000:]
    return "unknown error (see the Ray Tune trial folder)"


class TrialRunsCallback(Callback):
    """Tune callback on the driver: closes each trial's child run with its final status.

    A trial stopped by the scheduler is killed with its Ray Train run, so it cannot close its own
    run: here it is closed ``KILLED`` with ``trial_status=stopped_early``; a completed trial
    ``FINISHED`` (``completed``); an errored one ``FAILED`` (``failed``, with the error as tag and
    ``error.txt``). No trial run is left ``RUNNING``.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str) -> None:
        self._uri = tracking_uri
        self._experiment_id = experiment_id
        self._parent_run_id = parent_run_id
        self._mlflow: SafeMlflow | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mlflow": None}

    @property
    def mlflow(self) -> SafeMlflow:
        """The driver's MLflow client."""
        if self._mlflow is None:
            self._mlflow = SafeMlflow(self._uri)
        return self._mlflow

    def _close(self, trial, status: str, run_status: str, metrics: Mapping[str, Any], error: str | None) -> None:
        runs = find_child_runs(self.mlflow, self._experiment_id, self._parent_run_id, trial.trial_id)
        if not runs:
            logger.info("No MLflow run found for trial %s (status %s)", trial.trial_id, status)
        for run in runs:
            if run.info.status not in ("RUNNING", "SCHEDULED"):
                continue
            run_id = run.info.run_id
            tags = {STATUS_TAG: status}
            if error:
                tags["error"] = error.strip().splitlines()[-1][:4000] if error.strip() else error
                self.mlflow.log_text(run_id, error, "error.txt")
            self.mlflow.set_tags(run_id, tags)
            step = metrics.get("eval_step", 0)
            self.mlflow.log_metrics(
                run_id,
                {k: v for k, v in metrics.items() if k == "objective" or k.endswith("/objective")},
                step=int(step) if isinstance(step, int | float) and math.isfinite(step) else 0,
            )
            self.mlflow.terminate(run_id, run_status)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        last = dict(trial.last_result or {})
        if last.get("trial_complete"):
            self._close(trial, "completed", "FINISHED", last, None)
        else:
            self._close(trial, "stopped_early", "KILLED", last, None)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._close(trial, "failed", "FAILED", dict(trial.last_result or {}), _error_text(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._mlflow is not None:
            self._mlflow.warn_dropped("search driver")


def close_stale_child_runs(mlflow: SafeMlflow, experiment_id: str, parent_run_id: str, status: str) -> int:
    """Closes ``KILLED`` (tag ``trial_status=status``) the child runs left ``RUNNING`` by an
    interrupted driver; returns how many."""
    closed = 0
    for run in find_child_runs(mlflow, experiment_id, parent_run_id):
        if run.info.status in ("RUNNING", "SCHEDULED"):
            mlflow.set_tags(run.info.run_id, {STATUS_TAG: status})
            mlflow.terminate(run.info.run_id, "KILLED")
            closed += 1
    if closed:
        logger.info("Closed %d trial run(s) left RUNNING by the interrupted search", closed)
    return closed
