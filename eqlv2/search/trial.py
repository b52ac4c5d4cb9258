"""The Ray Tune trainable of the search (runs in the trial process): one Ray Train run per dataset.

``Tuner(TorchTrainer(...))`` does not work with Ray Train V2, so the trainable is a function that
fits a ``TorchTrainer`` per dataset, in a runner actor the trial owns, and passes rank 0's reports,
translated, to Tune (:mod:`eqlv2.search.train_runner`: how a stopped trial's process is reused).
Every result carries ``dataset``, the metrics prefixed with it (``lvis/AP``),
:data:`~eqlv2.search.optuna_study.STEP_KEY` (evaluations done by the trial, all datasets
together: ASHA's time, Optuna's step), ``<dataset>/objective`` (NaN until evaluated) and their
mean ``objective``; after the last run only, :data:`~eqlv2.search.optuna_study.COMPLETION_KEY`.

A search trial's MLflow run is created by the driver and named in its config (:data:`RUN_ID_KEY`);
a reference trial, or a trial of a resumed search, creates its run (or reopens the one of its
first attempt) itself (:mod:`eqlv2.search.mlflow_trial_run`). No trial writes its run's final
state: the driver does. Torch and detectron2 are imported only by the runner actor (9 s of CPU
and 0.8 GB the trial process does not pay), and MLflow only where the trial starts its own run
(1.2 s of CPU, most of it ``mlflow.genai``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray import tune

from .optuna_study import COMPLETION_KEY, STEP_KEY, TRIAL_NUMBER_KEY, read_finished_trial
from .references import TrialSetup, trial_setup
from .settings import RUN_ID_KEY, DatasetSpec, Objective, TrialSettings, evaluations_done
from .train_runner import fit_relayed

if TYPE_CHECKING:  # for the annotations only (detectron2 and MLflow run in the rank-0 worker)
    from detectron2.engine import PeriodicWriter

    from .mlflow_outbox import DurableMlflow
    from .mlflow_worker import TrialArtifactsHook

logger = logging.getLogger(__name__)

NAN = float("nan")


class TrialFailedError(RuntimeError):
    """A training run of the trial failed (the message names the dataset and the cause)."""


def combine_objectives(per_dataset: Mapping[str, float | None]) -> float:
    """Mean of the known, finite per-dataset objectives; NaN when none is known."""
    known = [float(v) for v in per_dataset.values() if v is not None and math.isfinite(float(v))]
    return sum(known) / len(known) if known else NAN


@dataclass
class ReportTranslator:
    """Turns rank 0's Ray Train reports of one training run into the search's Tune results.

    ``finished`` holds the final objectives of the datasets trained before in this trial,
    ``eval_offset`` their evaluations; ``schedule`` is ``(max_iter, eval_period)`` of this run,
    to count its evaluations from the reported iteration (right after a resume too).
    """

    dataset: DatasetSpec
    all_datasets: list[str]
    objective: Objective
    finished: Mapping[str, float | None]
    eval_offset: int
    schedule: tuple[int, int]
    _evals: int = field(default=0, init=False)
    _current: float | None = field(default=None, init=False)

    def __call__(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        name = self.dataset.name
        out = {f"{name}/{k}": v for k, v in metrics.items() if isinstance(v, int | float | str | bool) or v is None}
        iteration = metrics.get("iteration")
        if isinstance(iteration, int | float):
            self._evals = evaluations_done(int(iteration), *self.schedule)
        if self.dataset.eval_key in metrics:
            self._current = self.objective.value(metrics)
            if self._current is None:
                logger.warning("Evaluation of %s without a finite objective: %s", name, dict(metrics))
        per_dataset = {ds: self.finished.get(ds) for ds in self.all_datasets}
        per_dataset[name] = self._current
        for ds, value in per_dataset.items():
            out[f"{ds}/objective"] = NAN if value is None else float(value)
        out["objective"] = combine_objectives(per_dataset)
        out.update({STEP_KEY: self.eval_offset + self._evals, "dataset": name})
        if "iteration" in metrics:
            out["iteration"] = metrics["iteration"]
        return out


@dataclass(frozen=True)
class TrialRunHooks:
    """Picklable factories of the rank-0 hooks that write one training run into a trial's run (its
    id or outbox placeholder); ``baseline_ratio`` is a baseline's ``(C,)`` gradient ratio for the
    plots. The hooks (:mod:`eqlv2.search.mlflow_worker`) are imported where they run, and share
    one client when both factories come from one unpickled object (as a training run's config)."""

    tracking_uri: str
    outbox_root: str
    run_id: str
    dataset: str
    period: int = 20
    baseline_ratio: tuple[float, ...] | None = None

    @functools.cached_property
    def _mlflow(self) -> DurableMlflow:
        """One client for both hooks: the writer's deferred points go out with the other's calls."""
        # Imported here: this runs in the rank-0 worker, which imports MLflow anyway.
        from .mlflow_outbox import DurableMlflow

        return DurableMlflow.on_node(self.tracking_uri, self.outbox_root, short_retries=True)

    def writer(self, cfg, trainer) -> PeriodicWriter:
        from detectron2.engine import PeriodicWriter

        from .mlflow_worker import MlflowEventWriter

        writer = MlflowEventWriter(self._mlflow, self.run_id, self.dataset, cfg.SOLVER.MAX_ITER, cfg.DATASETS.TEST)
        return PeriodicWriter([writer], period=max(1, int(self.period)))

    def artifacts(self, cfg, trainer) -> TrialArtifactsHook:
        from .mlflow_worker import TrialArtifactsHook

        return TrialArtifactsHook(self._mlflow, self.run_id, self.dataset, cfg, self.baseline_ratio)


def _already_finished(settings: TrialSettings, number: int | None) -> dict[str, Any] | None:
    """The study's record of this trial if it is already finished (a resumed search only)."""
    if not settings.resume or number is None or not settings.optuna_storage or not settings.study_name:
        return None
    try:
        return read_finished_trial(settings.optuna_storage, settings.study_name, int(number))
    except Exception as error:
        logger.warning("Could not check the Optuna study for trial %s: %s", number, error)
        return None


def ray_train_run(
    settings: TrialSettings, spec: DatasetSpec, opts: list[str], translator: ReportTranslator, hooks: list, trial_dir: str
) -> dict:
    """A Ray Train ``TorchTrainer`` fitted in a runner actor the trial owns, rank 0's reports
    translated and passed to Tune by the trial's thread (:mod:`eqlv2.search.train_runner`);
    returns rank 0's final report."""
    storage = f"{trial_dir}/ray_train"  # the Ray Train runs' checkpoints
    if settings.remote_storage:
        storage = f"{settings.remote_storage}/{settings.search_name}/ray_train/{os.path.basename(trial_dir.rstrip('/'))}"
    return fit_relayed(functools.partial(_torch_trainer, settings, spec, opts, hooks, storage), translator)


def _torch_trainer(
    settings: TrialSettings, spec: DatasetSpec, opts: list[str], hooks: list, storage: str, callbacks: list
):
    """The run's ``TorchTrainer`` (built in the runner actor: imports Ray Train, torch, detectron2)."""
    from eqlv2.raytrain.launch import build_torch_trainer

    return build_torch_trainer(
        spec.config_file, opts, settings.num_workers, use_gpu=settings.use_gpu,
        storage_path=storage, name=spec.name, max_failures=settings.max_failures,
        callbacks=callbacks, extra_hooks=hooks, cpus_per_worker=settings.cpus_per_worker, checkpoints_to_keep=1,
    )  # fmt: skip


#: One training run of a trial: :func:`ray_train_run`, or a stand-in (``benchmarks/search_scale.py``).
TrainingRun = Callable[[TrialSettings, DatasetSpec, list[str], ReportTranslator, list, str], dict]


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
    """One trial: trains on each dataset with the trial's parameters and reports to Tune; a
    failed training run raises :class:`TrialFailedError` (Tune: ERROR, the study: FAIL)."""
    context = tune.get_context()
    trial_id, trial_dir = context.get_trial_id(), context.get_trial_dir()
    number = config.get(TRIAL_NUMBER_KEY)
    setup = trial_setup(config, settings.space, settings.seed)
    done = _already_finished(settings, number)
    if done is not None:
        return _report_recorded(done, trial_id, number)
    run_id = config.get(RUN_ID_KEY) if not settings.resume else None
    own_run = run_id is None and settings.tracked
    if own_run:  # imported here: the trial process of a search trial never needs MLflow
        from .mlflow_trial_run import start_trial_run

        run_id = start_trial_run(settings, trial_id, number, setup.values, setup)
    stopped = False
    try:
        final, evals = _train_datasets(settings, setup, run_id, trial_dir, training_run)
    except SystemExit:  # Tune stopped the trial: end at once, Tune reuses this process
        stopped = True
        raise
    finally:  # what this process wrote to the outbox is replayed (the rank-0 workers replay theirs)
        if own_run and not stopped:
            from .mlflow_trial_run import flush_trial_outbox

            flush_trial_outbox(settings, trial_id)
    tune.report({**final, STEP_KEY: evals, COMPLETION_KEY: 1})


def _train_datasets(
    settings: TrialSettings, setup: TrialSetup, run_id: str | None, trial_dir: str, training_run: TrainingRun
) -> tuple[dict[str, Any], int]:
    """Trains on each dataset in turn; the trial's final metrics and its evaluations done."""
    finished: dict[str, float | None] = {}
    final: dict[str, Any] = {}
    evals = 0
    for spec in settings.datasets:
        opts = [*settings.opts, *settings.space.config_overrides(setup.values), *setup.extra_opts, "SEED", str(setup.seed)]
        opts += ["OUTPUT_DIR", f"{trial_dir}/{spec.name}"]
        schedule = settings.schedules.get(spec.name, (1, 0))
        translator = ReportTranslator(spec, settings.dataset_names, settings.objective, dict(finished), evals, schedule)
        hooks = []
        if run_id is not None:
            baseline = settings.baseline_ratios.get(spec.name)
            factories = TrialRunHooks(settings.tracking_uri, settings.mlflow_outbox, run_id, spec.name, settings.log_period, baseline)
            hooks = [factories.writer, factories.artifacts]
        try:
            metrics = training_run(settings, spec, opts, translator, hooks, trial_dir)
        except Exception as error:  # reported to Tune (hence to the driver), which records the failure
            message = f"training on {spec.name} failed: {type(error).__name__}: {error}"
            logger.error("%s", message)
            raise TrialFailedError(message) from error
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        found = {key: float(numbers[key]) for key in spec.metrics if key in numbers}
        if not found:
            logger.warning("The last report of %s carries no evaluation metrics: %s", spec.name, sorted(metrics))
        finished[spec.name] = settings.objective.value(found)
        final.update({f"{spec.name}/{k}": v for k, v in numbers.items()})
        evals += settings.evaluations(spec.name)
    final.update({f"{ds}/objective": (NAN if v is None else v) for ds, v in finished.items()})
    # Final objective: every dataset must have one (else NaN, and the study records a failure).
    final["objective"] = combine_objectives(finished) if all(v is not None for v in finished.values()) else NAN
    return final, evals
