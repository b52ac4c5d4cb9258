"""A trial's MLflow run, written by the rank-0 Ray Train worker of each of its training runs.

* :class:`MlflowEventWriter`, a detectron2 ``EventWriter`` run by a ``PeriodicWriter``: every new
  scalar of the ``EventStorage`` (losses, ``lr``, ``eqlv2/...``, and the results ``EvalHook`` put
  there with the paper's columns) as ``<dataset>/<name>`` at the step "iterations done". The
  points are deferred (:meth:`DurableMlflow.defer_metrics`): they go out with the run's next
  call of the same client (the gradient summaries after an evaluation), after 30 s at the most,
  and after training; so a run stopped right after an evaluation's report has every point up to it.
* :class:`TrialArtifactsHook`: after every evaluation the gradient statistics (CSV table and
  per-group summaries); after training the ratio figure of the final statistics and the
  classifier weight norms (table and figure). Any table can be drawn later with
  :func:`eqlv2.search.plots.gradient_ratio_figure` and :func:`read_gradient_ratio`.

Neither writes the run's status (the driver does); both replay the outbox after training.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from detectron2.engine import HookBase
from detectron2.utils.events import EventWriter, get_event_storage

from eqlv2.data import category_statistics
from eqlv2.losses.statistics import summarize
from eqlv2.modeling import EQLv2FastRCNNOutputLayers
from eqlv2.raytrain.report_hook import evaluation_at, evaluation_metrics, is_evaluation_key

from .mlflow_outbox import DurableMlflow
from .plots import gradient_ratio_figure, weight_norms_figure

logger = logging.getLogger(__name__)


def category_csv(categories: Mapping[str, Any], columns: Mapping[str, Sequence[float]]) -> str:
    """CSV with one row per category: index, name, group, training count, then ``columns``."""
    count = len(categories["names"])
    groups = categories.get("groups") or [""] * count
    frame = pd.DataFrame({"category": range(count), "name": categories["names"], "group": groups, "train_count": categories["counts"]})
    for name, values in columns.items():
        frame[name] = [f"{float(v):.6g}" for v in values]
    return frame.to_csv(index=False)


def gradient_table(stats, categories: Mapping[str, Any]) -> str:
    """CSV of the per-category accumulated gradients, ratio, q and r."""
    return category_csv(categories, stats.as_columns())


def read_gradient_ratio(path: str) -> list[float]:
    """The ``ratio`` column of a gradient-statistics CSV (e.g. a baseline's, for the plots)."""
    return [float(value) for value in pd.read_csv(path)["ratio"]]


def classifier_weight_norms(model) -> list[float] | None:
    """``(C,)`` L2 norms of the category rows of the (last) box classifier, or None."""
    module = getattr(model, "module", model)
    predictors = [m for m in module.modules() if isinstance(m, EQLv2FastRCNNOutputLayers)]
    if not predictors:
        return None
    return [float(v) for v in predictors[-1].category_weight_norms().float().cpu()]


def category_table(dataset_name: str | None, num_classes: int) -> dict[str, list]:
    """Names, training counts and frequency groups of the categories of ``dataset_name``."""
    table: dict[str, Any] = {"names": [str(i) for i in range(num_classes)], "counts": [0.0] * num_classes, "groups": None}
    try:
        stats = category_statistics(dataset_name) if dataset_name else None
    except (KeyError, ValueError, FileNotFoundError, AttributeError) as error:  # plots go on without names
        logger.warning("No category statistics for %s: %s", dataset_name, error)
        stats = None
    if stats is not None and len(stats.image_counts) == num_classes:
        counts = stats.instance_counts if stats.instance_counts is not None else stats.image_counts
        table = {"names": list(stats.class_names), "counts": [float(v) for v in counts], "groups": list(stats.frequency_groups)}
    return table


class MlflowEventWriter(EventWriter):
    """Writes the ``EventStorage``'s new scalars to a trial's run (see the module docstring)."""

    def __init__(
        self, mlflow: DurableMlflow, run_id: str, dataset: str, max_iter: int, test_datasets: Sequence[str], defer_seconds: float = 30.0
    ) -> None:  # fmt: skip
        self._mlflow = mlflow
        self._defer_seconds = defer_seconds
        self._run_id = run_id
        self._prefix = f"{dataset}/"
        self._max_iter = int(max_iter)
        self._tests = tuple(test_datasets)
        self._last_write = -1

    def write(self) -> None:
        storage = get_event_storage()
        new = {key: (value, at) for key, (value, at) in storage.latest().items() if at > self._last_write}
        for iteration in sorted({at for _, at in new.values()}):
            scalars = {k: v for k, (v, at) in new.items() if at == iteration and not is_evaluation_key(k, self._tests)}
            scalars.update(evaluation_metrics(evaluation_at(storage, iteration, self._tests)))
            step = min(iteration + 1, self._max_iter)  # iterations done
            self._mlflow.defer_metrics(self._run_id, {self._prefix + k: v for k, v in scalars.items()}, step, self._defer_seconds)
            self._last_write = iteration

    def close(self) -> None:  # after training
        report = self._mlflow.flush()
        logger.info("Trial run %s (%s) after training: %s", self._run_id, self._prefix[:-1], report.summary())


class TrialArtifactsHook(HookBase):
    """Logs the gradient statistics after every evaluation, their figure and the weight norms after
    training (see the module docstring)."""

    def __init__(self, mlflow: DurableMlflow, run_id: str, dataset: str, cfg, baseline_ratio: Sequence[float] | None) -> None:
        self._mlflow = mlflow
        self._run_id = run_id
        self._dataset = dataset
        self._eval_period = int(cfg.TEST.EVAL_PERIOD)
        self._train_dataset = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None
        self._baseline = baseline_ratio
        self._categories: dict[str, list] | None = None

    def _categories_for(self, num_classes: int) -> dict[str, list]:
        if self._categories is None or len(self._categories["names"]) != num_classes:
            self._categories = category_table(self._train_dataset, num_classes)
        return self._categories

    def _log_gradient_statistics(self, step: int, with_figure: bool) -> None:
        tracker = getattr(self.trainer, "gradient_statistics", None)
        snapshots = tracker.snapshots() if tracker is not None else []
        folder = f"gradient_statistics/{self._dataset}"
        for stage, stats in enumerate(snapshots):
            suffix = "" if len(snapshots) == 1 else f"_stage{stage}"
            categories = self._categories_for(len(stats.ratio))
            self._mlflow.log_metrics(self._run_id, summarize(stats, categories["groups"], prefix=f"{self._dataset}/grad/"), step)
            self._mlflow.log_text(self._run_id, gradient_table(stats, categories), f"{folder}/iter_{step:07d}{suffix}.csv")
            if not with_figure:
                continue
            figure = gradient_ratio_figure(
                stats.ratio, categories["counts"], groups=categories["groups"], baseline_ratio=self._baseline,
                title=f"{self._dataset}: pos/neg gradient ratio at iteration {step}",
            )  # fmt: skip
            self._mlflow.log_figure(self._run_id, figure, f"{folder}/ratio_iter_{step:07d}{suffix}.png")

    def _log_weight_norms(self) -> None:
        norms = classifier_weight_norms(self.trainer.model)
        if norms is None:
            return
        categories = self._categories_for(len(norms))
        table = category_csv(categories, {"weight_norm": norms})
        self._mlflow.log_text(self._run_id, table, f"weight_norms/{self._dataset}.csv")
        title = f"{self._dataset}: classifier weight norms of the final model"
        figure = weight_norms_figure(norms, categories["counts"], groups=categories["groups"], title=title)
        self._mlflow.log_figure(self._run_id, figure, f"weight_norms/{self._dataset}.png")

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if self._eval_period > 0 and done % self._eval_period == 0 and done < self.trainer.max_iter:
            self._log_gradient_statistics(done, with_figure=False)
            self._mlflow.send_deferred(self._run_id)  # before the report that may stop the run

    def after_train(self) -> None:
        if self.trainer.iter >= self.trainer.max_iter:  # training completed
            self._log_gradient_statistics(self.trainer.max_iter, with_figure=True)
            self._log_weight_norms()
        self._mlflow.flush()
