"""The stand-in training run of ``benchmarks/search_scale.py``: detectron2's model and Ray Train
replaced by a documented function of (gamma, mu, alpha), everything around it the project's own.

A trial of the benchmark is the search's :func:`eqlv2.search.trial.run_trial` (its MLflow run,
report translation, final report) with :func:`standin_training_run` in place of
:func:`eqlv2.search.trial.ray_train_run`. The stand-in runs a real detectron2 ``TrainerBase`` loop
whose ``run_step`` only sleeps and puts scalars into the ``EventStorage``; its hooks are

* detectron2's ``EvalHook`` with :func:`standin_results` as the evaluation (LVIS-style results);
* the trial's MLflow hooks (:class:`eqlv2.search.mlflow_worker.TrialRunHooks`): the metric
  history (``MlflowEventWriter``) and, after every evaluation, the gradient-statistics table,
  ratio figure and summaries (``TrialArtifactsHook``), from synthetic per-category statistics;
* :class:`TuneReportHook`, the project's ``RayReportHook`` reporting straight to Tune through the
  trial's ``ReportTranslator`` (what ``SearchReportCallback`` does with rank 0's Ray Train reports).

The stand-in's objective (mask AP, in points) at the end of training is

    quality = 30 - 0.15 (gamma - 10)^2 - 40 (mu - 0.75)^2 - 0.6 (alpha - 3)^2

(best 30 at gamma 10, mu 0.75, alpha 3). After ``k`` of ``n`` iterations the AP is
``quality * (1 - exp(-3 k / n)) / (1 - exp(-3))`` plus Gaussian noise (std 0.5, seeded by the
parameters and the iteration, so a point always gives the same curve). **Failure region:**
``alpha > 7`` (1/8 of the default space) diverges: the run raises ``FloatingPointError`` right
after its second evaluation, so failed trials have intermediate values. Until then its curve is
the optimum's (quality 30): were it its own (the lowest of the space), ASHA would stop it at its
first evaluation, before it diverges, and the search would have no failed trial.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase, TrainerBase
from detectron2.engine.hooks import EvalHook
from ray import tune

from eqlv2.losses.statistics import GradientStatistics
from eqlv2.raytrain.report_hook import RayReportHook
from eqlv2.search.settings import DatasetSpec, TrialSettings
from eqlv2.search.space import CONFIG_KEYS
from eqlv2.search.trial import ReportTranslator, run_trial

__all__ = [
    "DIVERGING_ALPHA",
    "standin_quality",
    "standin_results",
    "standin_training_run",
    "standin_trial",
]

#: Trials with alpha above this diverge (raise) after their second evaluation.
DIVERGING_ALPHA = 7.0
#: The stand-in's best final AP (gamma 10, mu 0.75, alpha 3).
BEST_QUALITY = 30.0
#: Evaluations a diverging trial completes before it raises.
EVALS_BEFORE_DIVERGING = 2
#: Seconds the stand-in sleeps per logging period (``MODEL.EQLV2.LOG_PERIOD`` iterations).
STEP_SECONDS_ENV = "EQLV2_STANDIN_STEP_SECONDS"


def standin_quality(gamma: float, mu: float, alpha: float) -> float:
    """The stand-in's final AP without noise (the module docstring)."""
    return BEST_QUALITY - 0.15 * (gamma - 10.0) ** 2 - 40.0 * (mu - 0.75) ** 2 - 0.6 * (alpha - 3.0) ** 2


def _curve_quality(values: Mapping[str, float]) -> float:
    """The final AP a run's curve heads for: a diverging run's is the optimum's (the module docstring)."""
    if values["alpha"] > DIVERGING_ALPHA:
        return BEST_QUALITY
    return standin_quality(values["gamma"], values["mu"], values["alpha"])


def _noise(values: Mapping[str, float], iteration: int) -> float:
    """Gaussian noise (std 0.5) seeded by the parameters and the iteration."""
    key = repr((sorted(values.items()), iteration)).encode()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return float(np.random.default_rng(seed).normal(0.0, 0.5))


def standin_results(
    values: Mapping[str, float], iteration: int, max_iter: int
) -> dict[str, dict[str, float]]:
    """LVIS-style evaluation results (``bbox`` and ``segm``) after ``iteration`` iterations."""
    progress = (1.0 - math.exp(-3.0 * iteration / max_iter)) / (1.0 - math.exp(-3.0))
    ap = _curve_quality(values) * progress + _noise(values, iteration)
    segm = {"AP": ap, "APr": 0.4 * ap, "APc": 0.9 * ap, "APf": 1.3 * ap}
    return {"bbox": {key: value + 1.0 for key, value in segm.items()}, "segm": segm}


def _values(opts: Sequence[str]) -> dict[str, float]:
    """gamma, mu and alpha from the run's config overrides (the last value of each key wins)."""
    found = {}
    for index in range(0, len(opts) - 1, 2):
        for name, key in CONFIG_KEYS.items():
            if opts[index] == key:
                found[name] = float(opts[index + 1])
    return found


class _SyntheticStatistics:
    """The trainer's ``gradient_statistics``: per-category ratios that drift with training."""

    def __init__(self, trainer: StandInTrainer) -> None:
        self._trainer = trainer

    def snapshots(self) -> list[GradientStatistics]:
        done = self._trainer.iter + 1
        counts = np.array([2.0] * 4 + [30.0] * 4 + [300.0] * 4)
        pos = counts * done * 0.01
        neg = np.full_like(pos, done * 1.0)
        ratio = pos / (neg + 1e-12)
        return [GradientStatistics(pos_grad=pos, neg_grad=neg, ratio=ratio, q=1.0 + ratio, r=ratio)]


class StandInTrainer(TrainerBase):
    """A detectron2 training loop whose step sleeps and records a falling loss.

    Args:
        values: gamma, mu and alpha.
        max_iter: iterations of the run.
        sleep_per_iter: seconds each step sleeps.
        diverge_at: iteration after which the step raises (None: never).
    """

    def __init__(
        self,
        values: Mapping[str, float],
        max_iter: int,
        sleep_per_iter: float,
        diverge_at: int | None,
    ) -> None:
        super().__init__()
        self.values = dict(values)
        self.max_iter = max_iter
        self.sleep_per_iter = sleep_per_iter
        self.diverge_at = diverge_at
        self.model = torch.nn.Identity()  # no EQL v2 classifier: no weight norms to log
        self.gradient_statistics = _SyntheticStatistics(self)

    def run_step(self) -> None:
        done = self.iter + 1
        if self.diverge_at is not None and done > self.diverge_at:
            raise FloatingPointError(
                f"stand-in loss diverged at iteration {done} (alpha > {DIVERGING_ALPHA})"
            )
        time.sleep(self.sleep_per_iter)
        quality = _curve_quality(self.values)
        loss = 2.0 * math.exp(-done / self.max_iter * (1.0 + quality / BEST_QUALITY)) + 0.02 * _noise(
            self.values, -done
        )
        self.storage.put_scalars(
            total_loss=loss, loss_cls=0.6 * loss, loss_box_reg=0.4 * loss, lr=0.02
        )


class TuneReportHook(RayReportHook):
    """The project's ``RayReportHook`` (same reports, same metrics) reporting to Tune directly:
    each report translated by the trial's ``ReportTranslator``, as ``SearchReportCallback`` does."""

    def __init__(self, cfg: CfgNode, translator: ReportTranslator) -> None:
        super().__init__(cfg)
        self._translate = translator
        self.final: dict[str, Any] = {}

    def report(self, iteration: int, with_checkpoint: bool, evaluated: bool) -> None:
        self.final = self.metrics(iteration, evaluated)
        tune.report(self._translate(self.final))


def _run_config(max_iter: int, eval_period: int, log_period: int) -> CfgNode:
    """The config keys the hooks read."""
    cfg = CfgNode()
    cfg.SOLVER = CfgNode({"MAX_ITER": max_iter, "CHECKPOINT_PERIOD": 0})
    cfg.TEST = CfgNode({"EVAL_PERIOD": eval_period})
    cfg.DATASETS = CfgNode({"TRAIN": (), "TEST": ("standin_val",)})
    cfg.MODEL = CfgNode({"EQLV2": CfgNode({"LOG_PERIOD": log_period})})
    return cfg


def _step_seconds() -> float:
    return float(os.environ.get(STEP_SECONDS_ENV, "0.5"))


def standin_training_run(
    settings: TrialSettings,
    spec: DatasetSpec,
    opts: list[str],
    translator: ReportTranslator,
    hooks: list[Callable[[CfgNode, TrainerBase], HookBase]],
    trial_dir: str,
) -> dict:
    """A :data:`eqlv2.search.trial.TrainingRun`: the stand-in in place of a Ray Train run.

    Its schedule is the driver's (``settings.schedules``, ``settings.log_period``); its
    parameters are read from the run's config overrides, as detectron2 would.
    """
    values = _values(opts)
    max_iter, eval_period = settings.schedules[spec.name]
    log_period = max(1, settings.log_period)
    diverge_at = EVALS_BEFORE_DIVERGING * eval_period if values["alpha"] > DIVERGING_ALPHA else None
    trainer = StandInTrainer(values, max_iter, _step_seconds() / log_period, diverge_at)
    cfg = _run_config(max_iter, eval_period, log_period)
    report_hook = TuneReportHook(cfg, translator)
    evaluation = EvalHook(
        eval_period, lambda: standin_results(values, min(trainer.iter + 1, max_iter), max_iter)
    )
    trainer.register_hooks([evaluation, *(factory(cfg, trainer) for factory in hooks), report_hook])
    trainer.train(0, max_iter)
    return report_hook.final


def standin_trial(config: dict[str, Any], settings: TrialSettings) -> None:
    """The benchmark's Tune trainable: the search's trial with the stand-in training run."""
    run_trial(config, settings, training_run=standin_training_run)
