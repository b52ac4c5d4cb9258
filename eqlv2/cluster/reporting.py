"""Metrics and checkpoints of a detectron2 trainer, reported to Ray Train from every worker.

:class:`RayReportHook` runs on every worker (``ray.train.report`` is a barrier: all workers must
call it equally often). Rank 0 reports the metrics and writes the checkpoint; the others report
``{"iteration": n}`` and no checkpoint. See :mod:`eqlv2.cluster.ray_train` for the metric keys.

Checkpoint layout (one directory per checkpoint, ``checkpoint_<iteration:07d>`` in the run's
storage folder)::

    model.pth        detectron2 checkpoint: {"model": state_dict (with the EQL v2 buffers
                     pos_grad, neg_grad, num_updates of every box predictor), "trainer":
                     {"iteration", "_trainer": {"optimizer", ...}, "hooks": {"LRScheduler": ...}},
                     "iteration"}; the iterations are 0-based indices of the last one done, as in
                     detectron2's own checkpoints. Loadable by ``DetectionCheckpointer`` (resume)
                     and as ``MODEL.WEIGHTS``
    last_checkpoint  detectron2's pointer to model.pth
    metadata.json    {"iteration": completed iterations, "last_iter": index of the last one,
                     "world_size", "metrics": the metrics reported with it, "eqlv2_statistics":
                     [{"pos_grad": [...], "neg_grad": [...], "num_updates": n}, one per loss]}
    config.yaml      the full detectron2 config of the run
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import tempfile
import weakref
from collections.abc import Mapping
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

__all__ = [
    "CHECKPOINT_CONFIG_FILE",
    "CHECKPOINT_METADATA_FILE",
    "CHECKPOINT_MODEL_FILE",
    "RayReportHook",
    "checkpoint_dir_name",
    "evaluation_metrics",
    "eqlv2_statistics",
    "paper_columns",
    "restore_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_MODEL_FILE = "model.pth"
CHECKPOINT_METADATA_FILE = "metadata.json"
CHECKPOINT_CONFIG_FILE = "config.yaml"


def checkpoint_dir_name(iteration: int) -> str:
    """Name of the checkpoint directory after ``iteration`` completed iterations."""
    return f"checkpoint_{iteration:07d}"


# --------------------------------------------------------------------------- evaluation results
def _lvis_paper_columns(results: Mapping[str, Any]) -> dict[str, float]:
    """AP, APr, APc, APf (mask AP when there is one, else box AP) and APb from detectron2 results."""
    task = "segm" if isinstance(results.get("segm"), Mapping) else "bbox"
    columns: dict[str, float] = {}
    main = results.get(task)
    if isinstance(main, Mapping):
        for key in ("AP", "APr", "APc", "APf"):
            if key in main:
                columns[key] = float(main[key])
    box = results.get("bbox")
    if isinstance(box, Mapping) and "AP" in box:
        columns["APb"] = float(box["AP"])
    return columns


def _project_summary():
    """``eqlv2.evaluation.summary`` when the project provides it, else None."""
    if importlib.util.find_spec("eqlv2.evaluation") is None:
        return None
    return getattr(importlib.import_module("eqlv2.evaluation"), "summary", None)


def paper_columns(results: Mapping[str, Any]) -> dict[str, float]:
    """The paper's table columns of detectron2 evaluation results.

    * OpenImages (box results with frequency groups): ``AP``, ``AP1`` .. ``AP5``.
    * LVIS: ``eqlv2.evaluation.summary`` (``AP``, ``APr``, ``APc``, ``APf`` — mask numbers when
      there are masks — and ``APb``); without it, or for results it does not take (COCO), the
      same columns as far as the results have them.

    Results of several test datasets (nested one level deeper) give ``<dataset>/<column>`` keys.
    """
    if not results:
        return {}
    nested = all(isinstance(value, Mapping) for value in results.values()) and not (
        {"bbox", "segm"} & set(results)
    )
    if nested and len(results) > 1:
        return {
            f"{dataset}/{key}": value
            for dataset, per_dataset in results.items()
            for key, value in paper_columns(per_dataset).items()
        }
    if nested:
        (results,) = results.values()
    box = results.get("bbox")
    if isinstance(box, Mapping) and "AP1" in box:
        return {key: float(value) for key, value in box.items() if re.fullmatch(r"AP\d*", key)}
    summary = _project_summary()
    if summary is not None:
        try:
            return {key: float(value) for key, value in summary(results).items()}
        except (KeyError, ValueError) as error:
            logger.debug("eqlv2.evaluation.summary does not take these results (%s)", error)
    return _lvis_paper_columns(results)


def evaluation_metrics(results: Mapping[str, Any] | None) -> dict[str, float]:
    """Flat metrics of detectron2 evaluation results: ``"bbox/AP"``, ... plus :func:`paper_columns`."""
    if not results:
        return {}
    metrics = {key: float(value) for key, value in flatten_results_dict(results).items()}
    metrics.update(paper_columns(results))
    return metrics


# --------------------------------------------------------------------------- checkpoints
def eqlv2_statistics(model) -> list[dict[str, Any]]:
    """The gradient statistics of every EQL v2 loss in ``model`` as plain lists."""
    from eqlv2.modeling.roi_heads import classification_losses

    return [
        {
            "pos_grad": loss.pos_grad.detach().double().cpu().tolist(),
            "neg_grad": loss.neg_grad.detach().double().cpu().tolist(),
            "num_updates": int(loss.num_updates),
        }
        for loss in classification_losses(model)
        if hasattr(loss, "pos_grad") and hasattr(loss, "neg_grad")
    ]


def save_checkpoint(
    trainer, directory: str, iteration: int, metrics: Mapping[str, Any], config_yaml: str
) -> None:
    """Write the checkpoint of ``trainer`` after ``iteration`` completed iterations (rank 0 only).

    The detectron2 checkpoint records ``iteration - 1`` as its iteration, as detectron2's own
    checkpoints do, so that loading it resumes at iteration ``iteration``.
    """
    current = trainer.iter
    trainer.iter = iteration - 1  # after train(), detectron2 leaves iter at max_iter
    try:
        # Hooks hold their trainer as a weakref proxy already (detectron2's register_hooks).
        proxy = trainer if isinstance(trainer, weakref.ProxyTypes) else weakref.proxy(trainer)
        checkpointer = DetectionCheckpointer(trainer.model, directory, trainer=proxy, save_to_disk=True)
        # The extra "iteration" key is what detectron2's PeriodicCheckpointer adds too.
        checkpointer.save(os.path.splitext(CHECKPOINT_MODEL_FILE)[0], iteration=iteration - 1)
    finally:
        trainer.iter = current
    metadata = {
        "iteration": iteration,
        "last_iter": iteration - 1,
        "world_size": comm.get_world_size(),
        "metrics": dict(metrics),  # NaN (e.g. AP of an empty group) is written as NaN
        "eqlv2_statistics": eqlv2_statistics(trainer.model),
    }
    with open(os.path.join(directory, CHECKPOINT_METADATA_FILE), "w") as f:
        json.dump(metadata, f)
    with open(os.path.join(directory, CHECKPOINT_CONFIG_FILE), "w") as f:
        f.write(config_yaml)


def restore_checkpoint(trainer, checkpoint) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``trainer`` (on every rank).

    Model (with the EQL v2 statistics), optimizer, LR scheduler and iteration are restored and
    ``trainer.start_iter`` is set to the next iteration.

    Args:
        trainer: a detectron2 ``DefaultTrainer``.
        checkpoint: a ``ray.train.Checkpoint``.

    Returns:
        The checkpoint's ``metadata.json``.
    """
    with checkpoint.as_directory() as directory:
        trainer.checkpointer.load(os.path.join(directory, CHECKPOINT_MODEL_FILE))
        with open(os.path.join(directory, CHECKPOINT_METADATA_FILE)) as f:
            metadata = json.load(f)
    trainer.start_iter = trainer.iter + 1
    logger.info(
        "Restored %s: resuming at iteration %d of %d", checkpoint.path, trainer.start_iter, trainer.max_iter
    )
    return metadata


# --------------------------------------------------------------------------- the hook
def _mean_over_workers(per_worker: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over the workers that have it; keys in the order rank 0 has them."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for scalars in per_worker:
        for key, value in scalars.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


class RayReportHook(HookBase):
    """Reports to Ray Train: training metrics periodically, checkpoints with evaluations.

    On every worker, after the step that completes iteration ``n`` (1-based):

    * ``n`` a multiple of ``eval_period`` (detectron2's EvalHook just ran) or of
      ``checkpoint_period``: a report with the metrics, the evaluation results if any, and a
      checkpoint;
    * else ``n`` a multiple of ``report_period``: a report with the training metrics;
    * after training finished (the final evaluation ran): a report with the final evaluation
      and the final checkpoint. The last iteration's periodic report is left to this one.

    Training metrics are the latest detectron2 scalars of every worker (median of the last
    ``smoothing_window`` iterations for smoothed ones), averaged over the workers that have them
    (losses are already averaged by detectron2 and exist on rank 0 only).
    """

    def __init__(
        self,
        report_period: int,
        eval_period: int,
        checkpoint_period: int,
        config_yaml: str,
        smoothing_window: int = 20,
    ) -> None:
        """
        Args:
            report_period: iterations between training-metric reports; 0 disables them.
            eval_period: ``TEST.EVAL_PERIOD``.
            checkpoint_period: iterations between checkpoints (``SOLVER.CHECKPOINT_PERIOD``);
                0 checkpoints at evaluations and at the end only.
            config_yaml: the full config, stored with every checkpoint.
            smoothing_window: window of detectron2's smoothed scalars.
        """
        self._report_period = max(int(report_period), 0)
        self._eval_period = max(int(eval_period), 0)
        self._checkpoint_period = max(int(checkpoint_period), 0)
        self._config_yaml = config_yaml
        self._window = smoothing_window
        self._evaluation_keys: set[str] = set()
        self.reports = 0

    @staticmethod
    def _multiple(iteration: int, period: int) -> bool:
        return period > 0 and iteration % period == 0

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done >= self.trainer.max_iter:
            return
        evaluated = self._multiple(done, self._eval_period)
        with_checkpoint = evaluated or self._multiple(done, self._checkpoint_period)
        if with_checkpoint or self._multiple(done, self._report_period):
            self.report(done, with_checkpoint=with_checkpoint, evaluated=evaluated)

    def after_train(self) -> None:
        # After a complete train(), detectron2 leaves iter at max_iter; an exception leaves it lower.
        if self.trainer.iter < self.trainer.max_iter:
            return
        self.report(self.trainer.max_iter, with_checkpoint=True, evaluated=True)

    def metrics(self, iteration: int, evaluated: bool) -> dict[str, Any]:
        """The report of rank 0 (``{"iteration": n}`` elsewhere); a collective over workers."""
        storage = get_event_storage()
        scalars = {
            key: float(value)
            for key, (value, _) in storage.latest_with_smoothing_hint(self._window).items()
        }
        gathered = comm.gather(scalars, dst=0)
        if not comm.is_main_process():
            return {"iteration": iteration}
        evaluation = (
            evaluation_metrics(getattr(self.trainer, "_last_eval_results", None)) if evaluated else {}
        )
        self._evaluation_keys.update(evaluation)
        metrics: dict[str, Any] = {"iteration": iteration}
        for key, value in _mean_over_workers(gathered).items():
            if key not in self._evaluation_keys:  # results of an earlier evaluation
                metrics[key] = value
        metrics.update(evaluation)
        return metrics

    def report(self, iteration: int, with_checkpoint: bool, evaluated: bool) -> None:
        """Report (and on rank 0 checkpoint) after ``iteration`` completed iterations."""
        import ray.train

        metrics = self.metrics(iteration, evaluated)
        if with_checkpoint and comm.is_main_process():
            with tempfile.TemporaryDirectory(prefix="eqlv2-checkpoint-") as directory:
                save_checkpoint(self.trainer, directory, iteration, metrics, self._config_yaml)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(directory),
                    checkpoint_dir_name=checkpoint_dir_name(iteration),
                )
        else:
            ray.train.report(metrics)
        self.reports += 1
