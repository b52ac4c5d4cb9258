"""The stand-in training run of ``benchmarks/search_scale.py``: detectron2's model and Ray Train
replaced by a documented function of (gamma, mu, alpha), everything around it the project's own.

**Real** (the project's code, unchanged): a trial of the benchmark is the search's
:func:`eqlv2.search.trial.run_trial` (the Optuna check and the MLflow run of a resumed trial, the
run the driver created for a new one, the final report with the completion marker) with
:func:`standin_training_run` in place of :func:`eqlv2.search.trial.ray_train_run` (the
``training_run=`` seam). Every report of the training loop goes through the trial's
``ReportTranslator`` to ``tune.report`` from the trial's thread, as ``fit_relayed`` passes rank 0's reports.
The training loop is a detectron2 ``TrainerBase`` with detectron2's ``EvalHook``, the trial's
MLflow hooks (:class:`eqlv2.search.trial.TrialRunHooks`: the metric history through
``MlflowEventWriter``, its points deferred to the next evaluation; after every evaluation the
gradient-statistics table and summaries, after training the ratio figure, through ``TrialArtifactsHook``) and the project's ``RayReportHook`` metrics
(``benchmarks/scale_worker.py``).

**Stand-in**: the step only sleeps and puts scalars into the ``EventStorage``; the evaluation is
:func:`standin_results`; the gradient statistics are synthetic; the report hook hands its metrics
to the trial instead of ``ray.train.report``. And the process: in a search the loop runs in a Ray
Train worker beside the trial process; here it runs in a process forked from the stand-in worker
server (``scale_worker.py``, one per benchmark, which imported detectron2 once), connected to
the trial by a Unix socket. So the trial process imports what a search's trial process imports
before its Ray Train run (Ray Tune, Optuna; not MLflow, torch or detectron2). When Tune stops a
trial, the trial kills its forked worker, as Ray kills a stopped trial's Ray Train workers.
``EQLV2_STANDIN_IN_PROCESS=1`` runs the loop in the trial process instead (how the benchmark ran
before: every trial process then imports torch and detectron2).

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

import cProfile
import hashlib
import math
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection
from typing import Any

import numpy as np
from ray import tune

from eqlv2.search.settings import DatasetSpec, TrialSettings
from eqlv2.search.space import CONFIG_KEYS
from eqlv2.search.trial import ReportTranslator, run_trial

__all__ = [
    "DIVERGING_ALPHA",
    "StandInJob",
    "profiled",
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
#: The stand-in worker server's socket and key (set by ``search_scale.py``, inherited by Ray's workers).
SERVER_ENV = "EQLV2_STANDIN_SERVER"
AUTHKEY_ENV = "EQLV2_STANDIN_AUTHKEY"
#: ``1``: run the training loop in the trial process (no worker server).
IN_PROCESS_ENV = "EQLV2_STANDIN_IN_PROCESS"
#: A folder for :func:`profiled`: each trial's ``run_trial`` and each forked worker's loop write a
#: cProfile there (``search_scale.py --profile-trials``).
PROFILE_DIR_ENV = "EQLV2_STANDIN_PROFILE_DIR"


class StandInTrainingError(RuntimeError):
    """The stand-in's training run failed (e.g. it diverged); the message names the cause."""


def standin_quality(gamma: float, mu: float, alpha: float) -> float:
    """The stand-in's final AP without noise (the module docstring)."""
    return BEST_QUALITY - 0.15 * (gamma - 10.0) ** 2 - 40.0 * (mu - 0.75) ** 2 - 0.6 * (alpha - 3.0) ** 2


def curve_quality(values: Mapping[str, float]) -> float:
    """The final AP a run's curve heads for: a diverging run's is the optimum's (the module docstring)."""
    if values["alpha"] > DIVERGING_ALPHA:
        return BEST_QUALITY
    return standin_quality(values["gamma"], values["mu"], values["alpha"])


def noise(values: Mapping[str, float], iteration: int) -> float:
    """Gaussian noise (std 0.5) seeded by the parameters and the iteration."""
    key = repr((sorted(values.items()), iteration)).encode()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return float(np.random.default_rng(seed).normal(0.0, 0.5))


def standin_results(
    values: Mapping[str, float], iteration: int, max_iter: int
) -> dict[str, dict[str, float]]:
    """LVIS-style evaluation results (``bbox`` and ``segm``) after ``iteration`` iterations."""
    progress = (1.0 - math.exp(-3.0 * iteration / max_iter)) / (1.0 - math.exp(-3.0))
    ap = curve_quality(values) * progress + noise(values, iteration)
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


@dataclass(frozen=True)
class StandInJob:
    """One stand-in training run, as the trial sends it to its worker (picklable).

    Attributes:
        values: gamma, mu and alpha.
        max_iter, eval_period, log_period: the run's schedule (the driver's).
        sleep_per_iter: seconds each step sleeps.
        diverge_at: iteration after which the step raises (None: never).
        hooks: the trial's rank-0 hook factories (``TrialRunHooks``' writer and artifacts).
    """

    values: dict[str, float]
    max_iter: int
    eval_period: int
    log_period: int
    sleep_per_iter: float
    diverge_at: int | None
    hooks: list


def _job(settings: TrialSettings, spec: DatasetSpec, opts: list[str], hooks: list) -> StandInJob:
    """The run's job: parameters from its config overrides (as detectron2 reads them), schedule
    from the driver's settings."""
    values = _values(opts)
    max_iter, eval_period = settings.schedules[spec.name]
    log_period = max(1, settings.log_period)
    diverge_at = EVALS_BEFORE_DIVERGING * eval_period if values["alpha"] > DIVERGING_ALPHA else None
    step_seconds = float(os.environ.get(STEP_SECONDS_ENV, "0.5"))
    return StandInJob(values, max_iter, eval_period, log_period, step_seconds / log_period, diverge_at, list(hooks))


def _kill(pid: int | None) -> None:
    """Kills a stopped trial's worker (as Ray kills a stopped trial's Ray Train workers)."""
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _relay(conn: Connection, translator: ReportTranslator) -> dict:
    """Forwards the worker's reports to Tune until its final report (returned) or its error."""
    pid, done = None, False
    try:
        while True:
            try:
                kind, payload = conn.recv()
            except EOFError as error:
                raise StandInTrainingError("the stand-in worker died") from error
            if kind == "pid":
                pid = payload
            elif kind == "report":
                tune.report(translator(payload))  # raises SystemExit when Tune stops the trial
            else:
                done = True
                if kind == "error":
                    raise StandInTrainingError(payload)
                return payload
    finally:
        if not done:
            _kill(pid)


def _forked_run(job: StandInJob, translator: ReportTranslator) -> dict:
    """The job run by a worker forked from the stand-in worker server."""
    address, key = os.environ.get(SERVER_ENV), os.environ.get(AUTHKEY_ENV, "")
    if not address:
        raise StandInTrainingError(f"no stand-in worker server: {SERVER_ENV} is not set")
    with Client(address, family="AF_UNIX", authkey=bytes.fromhex(key)) as conn:
        conn.send(job)
        return _relay(conn, translator)


def standin_training_run(
    settings: TrialSettings,
    spec: DatasetSpec,
    opts: list[str],
    translator: ReportTranslator,
    hooks: list[Callable],
    trial_dir: str,
) -> dict:
    """A :data:`eqlv2.search.trial.TrainingRun`: the stand-in in place of a Ray Train run; returns
    the final report of its rank 0 (the worker). Raises when the run fails."""
    job = _job(settings, spec, opts, hooks)
    if os.environ.get(IN_PROCESS_ENV) == "1":
        from scale_worker import run_job  # detectron2 and torch, in this process

        return run_job(job, lambda metrics: tune.report(translator(metrics)))
    return _forked_run(job, translator)


def profiled(name: str, timer: Callable[[], float], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; under cProfile with ``timer`` when :data:`PROFILE_DIR_ENV` names a
    folder, the profile written there as ``<name>-<pid>-<ns>.prof`` (a process killed first
    writes none)."""
    folder = os.environ.get(PROFILE_DIR_ENV)
    if not folder:
        return fn(*args, **kwargs)
    profiler = cProfile.Profile(timer)
    try:
        return profiler.runcall(fn, *args, **kwargs)
    finally:
        profiler.dump_stats(f"{folder}/{name}-{os.getpid()}-{time.monotonic_ns()}.prof")


def standin_trial(config: dict[str, Any], settings: TrialSettings) -> None:
    """The benchmark's Tune trainable: the search's trial with the stand-in training run (its
    profile: CPU time of the trial's thread)."""
    profiled("trial", time.thread_time, run_trial, config, settings, training_run=standin_training_run)
