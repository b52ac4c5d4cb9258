"""What a detectron2 trainer reports to Ray Train, and when (every worker runs the hook).

``ray.train.report`` is a barrier: every worker calls it equally often; rank 0 reports the metrics
and writes the checkpoint, the others report ``{"iteration": n}``. Rank 0's report holds
``iteration`` (completed iterations), every scalar of the ``EventStorage`` averaged over the
workers and smoothed as detectron2's writers do, and after an evaluation the results ``EvalHook``
put into the ``EventStorage`` (``bbox/AP``, ...) with the paper's columns (:func:`paper_columns`).

When: every ``MODEL.EQLV2.LOG_PERIOD`` iterations; with a checkpoint every ``TEST.EVAL_PERIOD``
and ``SOLVER.CHECKPOINT_PERIOD`` iterations and after training. With Ray Tune, a training report
carries no evaluation keys: set ``TUNE_DISABLE_STRICT_METRIC_CHECKING=1`` or ``MODEL.EQLV2.LOG_PERIOD 0``.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import ray.train
from detectron2.config import CfgNode
from detectron2.engine import HookBase
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, get_event_storage

from eqlv2.evaluation import summary

from .checkpoints import save_checkpoint

#: First key part of the results detectron2's evaluators return (one per task).
EVALUATION_TASKS = ("bbox", "segm", "keypoints")


def is_evaluation_key(key: str, test_datasets: Sequence[str]) -> bool:
    """Whether an ``EventStorage`` scalar is an evaluation result put there by ``EvalHook``."""
    head = key.split("/", 1)[0]
    return head in EVALUATION_TASKS or head in test_datasets


def evaluation_at(storage: EventStorage, iteration: int, test_datasets: Sequence[str]) -> dict[str, Any]:
    """The results of the evaluation ``EvalHook`` put into ``storage`` at ``iteration``, nested as
    detectron2's evaluators return them (``{}`` if none ran then)."""
    results: dict[str, Any] = {}
    for key, (value, at) in storage.latest().items():
        if at == iteration and is_evaluation_key(key, test_datasets):
            *parents, leaf = key.split("/")
            node = results
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = float(value)
    return results


def paper_columns(results: Mapping[str, Any]) -> dict[str, float]:
    """The paper's table columns of detectron2 evaluation results: OpenImages ``AP``, ``AP1`` ..
    ``AP5``; LVIS ``AP``, ``APr``, ``APc``, ``APf``, ``APb``; COCO-style ``AP``, ``APb``; with
    several test datasets ``<dataset>/<column>``."""
    if not results:
        return {}
    if not {"bbox", "segm"} & set(results) and all(isinstance(v, Mapping) for v in results.values()):
        if len(results) == 1:
            return paper_columns(next(iter(results.values())))
        return {f"{name}/{k}": v for name, one in results.items() for k, v in paper_columns(one).items()}
    box = results.get("bbox") or {}
    if "AP1" in box:
        return {key: float(value) for key, value in box.items() if re.fullmatch(r"AP\d*", key)}
    if "APr" in (results.get("segm") or box):
        return summary(results)
    columns = {"AP": float((results.get("segm") or box)["AP"])}
    if "AP" in box:
        columns["APb"] = float(box["AP"])
    return columns


def evaluation_metrics(results: Mapping[str, Any] | None) -> dict[str, float]:
    """Flat metrics of detectron2 evaluation results: ``"bbox/AP"``, ... plus :func:`paper_columns`."""
    if not results:
        return {}
    metrics = {key: float(value) for key, value in flatten_results_dict(results).items()}
    metrics.update(paper_columns(results))
    return metrics


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
    """Reports to Ray Train (see the module docstring); the last iteration's periodic report is
    left to the final one, after training."""

    def __init__(self, cfg: CfgNode, smoothing_window: int = 20) -> None:
        self._report_period = max(int(cfg.MODEL.EQLV2.LOG_PERIOD), 0)
        self._eval_period = max(int(cfg.TEST.EVAL_PERIOD), 0)
        self._checkpoint_period = max(int(cfg.SOLVER.CHECKPOINT_PERIOD), 0)
        self._test_datasets = tuple(cfg.DATASETS.TEST)
        self._config_yaml = cfg.dump()
        self._window = smoothing_window

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
        if self.trainer.iter >= self.trainer.max_iter:
            self.report(self.trainer.max_iter, with_checkpoint=True, evaluated=True)

    def metrics(self, iteration: int, evaluated: bool) -> dict[str, Any]:
        """The report of rank 0 (``{"iteration": n}`` elsewhere); a collective over workers."""
        storage = get_event_storage()
        scalars = {
            key: float(value)
            for key, (value, _) in storage.latest_with_smoothing_hint(self._window).items()
            if not is_evaluation_key(key, self._test_datasets)
        }
        gathered = comm.gather(scalars, dst=0)
        if not comm.is_main_process():
            return {"iteration": iteration}
        metrics: dict[str, Any] = {"iteration": iteration, **_mean_over_workers(gathered)}
        if evaluated:
            metrics.update(evaluation_metrics(evaluation_at(storage, storage.iter, self._test_datasets)))
        return metrics

    def report(self, iteration: int, with_checkpoint: bool, evaluated: bool) -> None:
        """Reports (and on rank 0 checkpoints) after ``iteration`` completed iterations."""
        metrics = self.metrics(iteration, evaluated)
        if not (with_checkpoint and comm.is_main_process()):
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="eqlv2-checkpoint-") as directory:
            save_checkpoint(self.trainer, directory, iteration, metrics, self._config_yaml)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"checkpoint_{iteration:07d}",
            )
