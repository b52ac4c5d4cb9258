"""The Ray Tune trainable of the search (runs in the trial process): one Ray Train run per dataset.

``Tuner(TorchTrainer(...))`` does not work with Ray Train V2 (ray 2.60): the trainable is a function
that builds a ``TorchTrainer`` (:func:`eqlv2.raytrain.build_torch_trainer`) per dataset and
``fit()``s it, with :class:`SearchReportCallback` forwarding rank 0's reports to Tune.

Every result a trial reports to Tune carries:

* ``dataset`` and the rank-0 metrics prefixed with it (``lvis/total_loss``, ``lvis/AP``, ...);
* :data:`~eqlv2.search.optuna_study.STEP_KEY` (``eval_step``): evaluations done so far by the
  trial, all datasets together (ASHA's time attribute, Optuna's step);
* ``<dataset>/objective`` for every dataset (NaN until it has been evaluated) and ``objective``,
  the mean of those known — the same datasets are known at the same step in every trial, so ASHA
  compares like with like;
* after the last run only, :data:`~eqlv2.search.optuna_study.COMPLETION_KEY` = 1 with the
  final metrics of every dataset.

The trial creates its MLflow run (or, restarted by a resumed search, reopens the run of its
first attempt) and reports what happens to it (a failure is a :class:`TrialFailedError`); it
never writes the run's final state: the driver does. Its MLflow calls go through the node's
outbox and are replayed when the trial ends, before its last report.

Every trial is a new process, which imports this module first: it imports Ray Tune, MLflow and
Optuna (3.4 s of CPU, 0.25 GB), not torch, detectron2 or Ray Train's torch support (9 s more,
0.8 GB more), which only :func:`ray_train_run` loads.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from .mlflow_client import (
    PARENT_TAG,
    ROLE_TAG,
    SEARCH_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    limit_http_retries,
)
from .mlflow_outbox import DurableMlflow, node_outbox
from .optuna_study import COMPLETION_KEY, STEP_KEY, TRIAL_NUMBER_KEY, read_finished_trial
from .references import TrialSetup, trial_setup
from .run_hooks import TrialRunHooks
from .settings import DatasetSpec, Objective, TrialSettings, evaluations_done

logger = logging.getLogger(__name__)

__all__ = [
    "ReportTranslator", "SearchReportCallback", "TrainingRun", "TrialFailedError", "combine_objectives", "ray_train_run", "run_trial",
]  # fmt: skip

NAN = float("nan")


class TrialFailedError(RuntimeError):
    """A training run of the trial failed (the message names the dataset and the cause)."""


def combine_objectives(per_dataset: Mapping[str, float | None]) -> float:
    """Mean of the known, finite per-dataset objectives; NaN when none is known."""
    known = [float(v) for v in per_dataset.values() if v is not None and math.isfinite(float(v))]
    return sum(known) / len(known) if known else NAN


class ReportTranslator:
    """Turns rank 0's Ray Train reports of one training run into the search's Tune results.

    Args:
        dataset: the dataset of this training run.
        all_datasets: every dataset of the trial, in order.
        objective: the per-dataset objective.
        finished: final objectives of the datasets already trained in this trial.
        eval_offset: evaluations done by those earlier runs.
        schedule: ``(max_iter, eval_period)`` of this run, to count its evaluations from the
            reported iteration (right also when the run resumed from a checkpoint).
    """

    def __init__(
        self,
        dataset: DatasetSpec,
        all_datasets: list[str],
        objective: Objective,
        finished: Mapping[str, float | None],
        eval_offset: int,
        schedule: tuple[int, int],
    ) -> None:
        self._dataset = dataset
        self._all = list(all_datasets)
        self._objective = objective
        self._finished = dict(finished)
        self._offset = int(eval_offset)
        self._schedule = (int(schedule[0]), int(schedule[1]))
        self._evals = 0
        self._current: float | None = None

    def __call__(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The Tune result for one rank-0 report (see the module docstring)."""
        name = self._dataset.name
        out: dict[str, Any] = {}
        for key, value in metrics.items():
            if isinstance(value, int | float | str | bool) or value is None:
                out[f"{name}/{key}"] = value
        iteration = metrics.get("iteration")
        if isinstance(iteration, int | float):
            self._evals = evaluations_done(int(iteration), *self._schedule)
        if self._dataset.eval_key in metrics:
            self._current = self._objective.value(metrics)
            if self._current is None:
                logger.warning("Evaluation of %s without a finite objective: %s", name, dict(metrics))
        per_dataset = {ds: self._finished.get(ds) for ds in self._all}
        per_dataset[name] = self._current
        for ds, value in per_dataset.items():
            out[f"{ds}/objective"] = NAN if value is None else float(value)
        out["objective"] = combine_objectives(per_dataset)
        out[STEP_KEY] = self._offset + self._evals
        out["dataset"] = name
        if "iteration" in metrics:
            out["iteration"] = metrics["iteration"]
        return out


class SearchReportCallback(TuneReportCallback):
    """Forwards rank 0's Ray Train reports to Tune, translated by :class:`ReportTranslator`.

    Runs in the Ray Train controller; must be created inside the Tune trial (it connects to the
    trial's result queue).
    """

    def __init__(self, translator: ReportTranslator) -> None:
        super().__init__()
        self._translate = translator

    def after_report(self, run_context, metrics, checkpoint) -> None:
        translated = self._translate(dict(metrics[0]) if metrics else {})
        super().after_report(run_context, [translated], checkpoint)


def _trial_params(settings: TrialSettings, values: Mapping[str, Any], seed: int, extra: list[str]) -> dict[str, Any]:
    params = {name: values[name] for name in values}
    params["datasets"] = ",".join(settings.dataset_names)
    for spec in settings.datasets:
        params[f"config/{spec.name}"] = spec.config_file
    params["overrides"] = " ".join([*settings.opts, *extra]) or "-"
    params["seed"] = seed
    params["objective"] = settings.objective.text
    params["num_workers"] = settings.num_workers
    return params


def _already_finished(settings: TrialSettings, number: int | None) -> dict[str, Any] | None:
    """The study's record of this trial if it is already finished (a resumed search): the
    trial's own rows, read without keeping a connection."""
    if number is None or not settings.optuna_storage or not settings.study_name:
        return None
    try:
        return read_finished_trial(settings.optuna_storage, settings.study_name, int(number))
    except Exception as error:
        logger.warning("Could not check the Optuna study for trial %s: %s", number, error)
        return None


def _final_metrics(spec: DatasetSpec, metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key in spec.metrics:
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _trial_mlflow(settings: TrialSettings) -> DurableMlflow | None:
    """The trial's MLflow client (HTTP retries kept short in this process); None when not tracked."""
    if not (settings.tracking_uri and settings.experiment_id and settings.mlflow_outbox):
        return None
    limit_http_retries()
    return DurableMlflow(settings.tracking_uri, node_outbox(settings.mlflow_outbox))


def _start_run(
    settings: TrialSettings, trial_id: str, number: Any, values: Mapping[str, Any], setup: TrialSetup | None = None
) -> str | None:
    """Creates the trial's child run (RUNNING) with its params, or reopens the one a first
    attempt of this trial created (a resumed search); None when not tracked."""
    mlflow = _trial_mlflow(settings)
    if mlflow is None:
        return None
    setup = setup or TrialSetup(dict(values), [], settings.seed, "search", None)
    tags = {TRIAL_TAG: trial_id, STATUS_TAG: "running", SEARCH_TAG: settings.search_name, "optuna_trial_number": number}
    tags[ROLE_TAG] = setup.role
    if settings.parent_run_id:
        tags[PARENT_TAG] = settings.parent_run_id
        previous = mlflow.find_runs(settings.experiment_id, {PARENT_TAG: settings.parent_run_id, TRIAL_TAG: trial_id})
        if previous:
            logger.info("Trial %s continues its MLflow run %s", trial_id, previous[0].ref)
            mlflow.reopen(previous[0].ref, {**previous[0].tags, **tags})
            mlflow.set_tags(previous[0].ref, {STATUS_TAG: "running"})
            return previous[0].ref
    label = setup.label or ", ".join(f"{k}={float(v):.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    run_id = mlflow.create_run(settings.experiment_id, f"{trial_id} ({label})", tags)
    mlflow.log_params(run_id, _trial_params(settings, values, setup.seed, setup.extra_opts))
    return run_id


def _flush(settings: TrialSettings, trial_id: str) -> None:
    """Replays the node's outbox at the end of the trial (what is left stays for the driver)."""
    mlflow = _trial_mlflow(settings)
    if mlflow is not None:
        logger.info("Trial %s ended: %s", trial_id, mlflow.flush().summary())


def _ray_train_storage(settings: TrialSettings, trial_dir: str) -> str:
    """Where the trial's Ray Train runs keep their checkpoints (see ``TrialSettings.remote_storage``)."""
    if settings.remote_storage:
        return f"{settings.remote_storage}/{settings.search_name}/ray_train/{os.path.basename(trial_dir.rstrip('/'))}"
    return f"{trial_dir}/ray_train"


def ray_train_run(
    settings: TrialSettings, spec: DatasetSpec, opts: list[str], translator: ReportTranslator, hooks: list, trial_dir: str
) -> dict:
    """The training run of a search trial: a Ray Train ``TorchTrainer`` fitted, rank 0's reports
    forwarded to Tune by :class:`SearchReportCallback`; returns rank 0's final report.

    Ray Train, torch and detectron2 are imported here, not with this module: a trial process
    that trains nothing (a finished trial of a resumed search) does not load them.
    """
    from eqlv2.raytrain.launch import build_torch_trainer

    trainer = build_torch_trainer(
        spec.config_file, opts, settings.num_workers, use_gpu=settings.use_gpu,
        storage_path=_ray_train_storage(settings, trial_dir), name=spec.name, max_failures=settings.max_failures,
        callbacks=[SearchReportCallback(translator)], extra_hooks=hooks, cpus_per_worker=settings.cpus_per_worker,
        checkpoints_to_keep=1,
    )  # fmt: skip
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})


#: One training run of a trial: ``(settings, dataset, overrides, report translator, rank-0 hook
#: factories, trial folder)`` → rank 0's final report; raises when training fails. The search's
#: is :func:`ray_train_run`; ``benchmarks/search_scale.py`` passes a stand-in.
TrainingRun = Callable[[TrialSettings, DatasetSpec, list[str], ReportTranslator, list, str], dict]


def _train(
    training_run: TrainingRun, settings: TrialSettings, spec: DatasetSpec, opts: list[str], translator: ReportTranslator,
    hooks: list, trial_dir: str,
) -> dict:
    """One training run; its final report. Raises :class:`TrialFailedError` naming the cause."""
    try:
        return training_run(settings, spec, opts, translator, hooks, trial_dir)
    except Exception as error:  # reported to Tune (hence to the driver), which records the failure
        message = f"training on {spec.name} failed: {type(error).__name__}: {error}"
        logger.error("%s", message)
        raise TrialFailedError(message) from error


def _report_recorded(done: Mapping[str, Any], trial_id: str, number: Any) -> None:
    """Reports what the study recorded for a trial that finished before the driver was killed."""
    logger.info("Trial %s (Optuna #%s) already %s in the study: not trained again", trial_id, number, done["state"])
    if done["state"] == "FAIL":
        raise TrialFailedError(f"trial already failed in the Optuna study (#{number})")
    result = {STEP_KEY: 0, **done["metrics"]}
    if done["state"] == "COMPLETE":
        result[COMPLETION_KEY] = 1
    tune.report(result)


def run_trial(config: dict[str, Any], settings: TrialSettings, training_run: TrainingRun = ray_train_run) -> None:
    """One trial: train on each dataset with the trial's parameters (each run by
    ``training_run``); report to Tune.

    Raises:
        TrialFailedError: a training run failed (Tune marks the trial ERROR, the study FAIL).
    """
    context = tune.get_context()
    trial_id, trial_dir = context.get_trial_id(), context.get_trial_dir()
    number = config.get(TRIAL_NUMBER_KEY)
    setup = trial_setup(config, settings.space, settings.seed)
    values = setup.values
    done = _already_finished(settings, number)
    if done is not None:
        return _report_recorded(done, trial_id, number)
    run_id = _start_run(settings, trial_id, number, values, setup)
    try:
        final, evals = _train_datasets(settings, setup, run_id, trial_dir, training_run)
    finally:
        _flush(settings, trial_id)
    tune.report({**final, STEP_KEY: evals, COMPLETION_KEY: 1})


def _train_datasets(
    settings: TrialSettings, setup: TrialSetup, run_id: str | None, trial_dir: str, training_run: TrainingRun
) -> tuple[dict[str, Any], int]:
    """Trains on each dataset in turn; the trial's final metrics and its evaluations done."""
    values = setup.values
    finished: dict[str, float | None] = {}
    final: dict[str, Any] = {}
    evals = 0
    for spec in settings.datasets:
        opts = [*settings.opts, *settings.space.config_overrides(values), *setup.extra_opts, "SEED", str(setup.seed)]
        opts += ["OUTPUT_DIR", f"{trial_dir}/{spec.name}"]
        schedule = settings.schedules.get(spec.name, (1, 0))
        translator = ReportTranslator(spec, settings.dataset_names, settings.objective, finished, evals, schedule)
        hooks = []
        if run_id is not None:
            baseline = settings.baseline_ratios.get(spec.name)
            hooks = TrialRunHooks(settings.tracking_uri, settings.mlflow_outbox, run_id, spec.name, settings.log_period, baseline).factories()
        metrics = _train(training_run, settings, spec, opts, translator, hooks, trial_dir)
        found = _final_metrics(spec, metrics)
        if not found:
            logger.warning("The last report of %s carries no evaluation metrics: %s", spec.name, sorted(metrics))
        finished[spec.name] = settings.objective.value(found)
        final.update({f"{spec.name}/{k}": v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        evals += settings.evaluations(spec.name)
    final.update({f"{ds}/objective": (NAN if v is None else v) for ds, v in finished.items()})
    # Final objective: every dataset must have one (else NaN, and the study records a failure).
    final["objective"] = combine_objectives(finished) if all(v is not None for v in finished.values()) else NAN
    return final, evals
