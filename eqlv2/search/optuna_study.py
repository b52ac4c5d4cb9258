"""The Optuna study behind the search: its database, the seed points, honest trial states, and
the early stopping (ASHA) that makes some of them ``PRUNED``.

Ray's ``OptunaSearch`` tells Optuna ``COMPLETE`` for every trial that ends with a result, also
those ASHA stopped early, so TPE would model a truncated value as a final one.
:class:`TrialStateOptunaSearch` (ask-and-tell, in the driver, the study's only writer) tells
``COMPLETE`` only when the last result carries :data:`COMPLETION_KEY`, ``PRUNED`` (with the last
intermediate value) when a trial ends without it, and ``FAIL`` for an error or a non-finite
objective. Intermediate values are reported once per evaluation (:data:`STEP_KEY`). Each trial
carries its Tune id and experiment, so a resumed search marks its own orphaned trials (asked,
then the driver was killed) ``FAIL`` instead of leaving them ``RUNNING``.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from .space import finite_number, same_assignment

logger = logging.getLogger(__name__)

#: Result key (value 1) the trainable reports after its last training run: the trial is complete.
COMPLETION_KEY = "trial_complete"
#: Result key counting the evaluations a trial has done (all datasets): Optuna's step, ASHA's time.
STEP_KEY = "eval_step"
#: Config key the searcher adds to each suggestion: the Optuna trial number behind the Tune trial.
TRIAL_NUMBER_KEY = "optuna_trial_number"
#: Optuna user attributes set on each trial.
TUNE_TRIAL_ATTR, EXPERIMENT_ATTR, RESULT_ATTR, REASON_ATTR = "tune_trial_id", "experiment", "final_metrics", "fail_reason"

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def open_storage(url: str, reader: bool = False) -> optuna.storages.RDBStorage:
    """The RDB storage at ``url`` (tables created on first use).

    ``reader=True`` is for trial processes, which only read: no table creation, no schema check
    (Alembic's scripts and a second connection), and no pool: a pooled engine keeps its
    connections until garbage collected, and enough of them exhaust PostgreSQL's
    ``max_connections``.
    """
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):  # several processes may read the file at once
        engine_kwargs["connect_args"] = {"timeout": 60}
    if reader:  # imported here: SQLAlchemy costs a trial process 0.25 s of CPU it rarely needs
        from sqlalchemy.pool import NullPool

        engine_kwargs["poolclass"] = NullPool
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine_kwargs or None, skip_compatibility_check=reader, skip_table_creation=reader
    )


def build_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """Optuna sampler by name: ``tpe``, ``random`` or ``nsga2``."""
    name = name.lower()
    if name == "tpe":  # a few trials only: start modelling after 2 random draws instead of 10
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=2, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name in ("nsga2", "nsgaii"):
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=4)
    raise ValueError(f"unknown sampler {name!r}: use tpe, random or nsga2")


def pending_seed_points(study: optuna.Study, points: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The seed points the study does not hold yet (a failed attempt does not count)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL]
    pending = []
    for point in points:
        if any(same_assignment(trial.params, point) for trial in trials):
            logger.info("Seed point %s is already in study %r: not queued again", dict(point), study.study_name)
            continue
        pending.append(dict(point))
    return pending


def fail_orphaned_trials(
    study: optuna.Study, storage: optuna.storages.BaseStorage, experiment: str, keep_numbers: set[int], reason: str
) -> list[int]:
    """Marks ``FAIL`` the ``RUNNING`` trials of ``experiment`` not in ``keep_numbers`` (asked by a
    driver killed before it recorded them); returns their numbers."""
    marked = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(EXPERIMENT_ATTR) != experiment or trial.number in keep_numbers:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, REASON_ATTR, reason)
        study.tell(trial.number, state=TrialState.FAIL)
        marked.append(trial.number)
    if marked:
        logger.warning("Marked orphaned Optuna trials %s as FAIL (%s)", marked, reason)
    return marked


def _summary(trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    if trial.state not in _FINISHED:
        return None
    return {
        "state": trial.state.name,
        "metrics": dict(trial.user_attrs.get(RESULT_ATTR) or {}),
        "values": list(trial.values) if trial.values else None,
    }


def finished_trial_summary(study: optuna.Study, number: int) -> dict[str, Any] | None:
    """State and stored final metrics of trial ``number`` if it is finished, else None."""
    trials = study.get_trials(deepcopy=False)
    return _summary(trials[number]) if 0 <= number < len(trials) else None


def read_finished_trial(url: str, study_name: str, number: int) -> dict[str, Any] | None:
    """:func:`finished_trial_summary` read from the database at ``url`` (the trial's rows only,
    whatever the size of the study; no connection kept)."""
    storage = open_storage(url, reader=True)
    try:
        study_id = storage.get_study_id_from_name(study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    except KeyError:  # no such study or trial (yet)
        return None
    return _summary(storage.get_trial(trial_id))


class TrialStateOptunaSearch(Searcher):
    """A Tune searcher over an Optuna study (see the module docstring).

    ``metric`` and ``mode`` are one key or one per objective; ``points_to_evaluate`` are enqueued
    (pass only those the study lacks); ``record_keys`` are saved with a finished trial
    (:data:`RESULT_ATTR`), so a resumed search can report it without training it again;
    ``on_suggest(tune_trial_id, config)`` returns entries to add to a suggested trial's config
    (the driver's MLflow run of the trial, :class:`~eqlv2.search.mlflow_trial_run.TrialRunCreator`).
    """

    def __init__(
        self,
        space: dict[str, Any],
        metric: str | list[str],
        mode: str | list[str],
        *,
        points_to_evaluate: list[dict] | None = None,
        sampler: optuna.samplers.BaseSampler | None = None,
        study_name: str,
        storage: optuna.storages.BaseStorage,
        experiment: str,
        record_keys: Sequence[str] = (),
        on_suggest: Callable[[str, dict], Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self._space = dict(space)
        self._storage = storage
        self._experiment_name = experiment
        self._record_keys = list(record_keys)
        self._on_suggest = on_suggest
        modes = mode if isinstance(mode, list) else [mode]
        self.study = optuna.create_study(
            storage=storage, study_name=study_name, sampler=sampler, load_if_exists=True,
            directions=["maximize" if m == "max" else "minimize" for m in modes],
        )  # fmt: skip
        for point in points_to_evaluate or []:
            self.study.enqueue_trial(point)
        self._live: dict[str, optuna.Trial] = {}
        self._last_steps: dict[str, int] = {}

    def suggest(self, trial_id: str) -> dict | None:
        trial = self.study.ask(self._space)
        trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        trial.set_user_attr(EXPERIMENT_ATTR, self._experiment_name)
        self._live[trial_id] = trial
        config = {**trial.params, TRIAL_NUMBER_KEY: trial.number}
        if self._on_suggest is not None:
            try:
                config.update(self._on_suggest(trial_id, config))
            except Exception as exc:  # the trial then does it itself
                logger.warning("on_suggest failed for trial %s: %s", trial_id, exc)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not isinstance(self.metric, list):  # Optuna keeps no intermediate values of several objectives
            self._report_intermediate(trial_id, result)

    def _report_intermediate(self, trial_id: str, result: Mapping[str, Any]) -> None:
        if trial_id not in self._live or STEP_KEY not in result:
            return
        value = result.get(self.metric)
        step = int(result[STEP_KEY])
        if step <= 0 or step <= self._last_steps.get(trial_id, 0) or finite_number(value) is None:
            return
        self._live[trial_id].report(float(value), step)
        self._last_steps[trial_id] = step

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._live:
            logger.debug("Trial %s is not a live trial of this searcher (told already?)", trial_id)
            return
        trial = self._live[trial_id]
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result.get(key) for key in metrics] if result else None
        state, reason = self._outcome(result, values, error)
        try:
            if result and self._record_keys:
                recorded = {k: result[k] for k in self._record_keys if k in result and finite_number(result[k]) is not None}
                trial.set_user_attr(RESULT_ATTR, recorded)
            if reason:
                trial.set_user_attr(REASON_ATTR, reason)
            if state == TrialState.PRUNED and result and not isinstance(self.metric, list):
                # The result that made the scheduler stop the trial never reached
                # on_trial_result: record it so the pruned value is the one the decision saw.
                self._report_intermediate(trial_id, result)
            told = [float(v) for v in values] if state == TrialState.COMPLETE else None
            self.study.tell(trial.number, told if told is None or len(told) > 1 else told[0], state=state)
            logger.info("Optuna trial %d (Tune %s): %s", trial.number, trial_id, state.name)
        except Exception as exc:  # the database may be unreachable: keep the search going
            logger.warning("Could not record trial %s in the Optuna study: %s", trial_id, exc)
        del self._live[trial_id]

    @staticmethod
    def _outcome(result: Mapping[str, Any] | None, values: list | None, error: bool) -> tuple[TrialState, str | None]:
        if error:
            return TrialState.FAIL, "the trial raised an error (see the Tune and MLflow logs)"
        if not result or not result.get(COMPLETION_KEY):
            return TrialState.PRUNED, None
        if values is None or any(finite_number(v) is None for v in values):
            return TrialState.FAIL, f"non-finite objective {values}"
        return TrialState.COMPLETE, None

    def save(self, checkpoint_path: str) -> None:
        """Saves the live trials by number, not as ``optuna.Trial`` objects: those pickle their
        study and the storage's cache of every trial, so each save grew with the study."""
        live = {tune_id: trial.number for tune_id, trial in self._live.items()}
        with open(checkpoint_path, "wb") as handle:
            pickle.dump({"live": live, "last_steps": self._last_steps}, handle)

    def _live_trial(self, saved: int | optuna.Trial) -> optuna.Trial:
        """A live trial from its saved number (or, from an older save, itself)."""
        if isinstance(saved, optuna.Trial):
            return saved
        study_id = self._storage.get_study_id_from_name(self.study.study_name)
        return optuna.Trial(self.study, self._storage.get_trial_id_from_study_id_trial_number(study_id, saved))

    def restore(self, checkpoint_path: str) -> None:
        """Restores the live trials, then fails this experiment's orphaned ``RUNNING`` trials."""
        with open(checkpoint_path, "rb") as handle:
            state = pickle.load(handle)
        self._live = {tune_id: self._live_trial(saved) for tune_id, saved in state["live"].items()}
        self._last_steps = state["last_steps"]
        live = {trial.number for trial in self._live.values()}
        reason = "asked by a search driver that stopped before recording the trial"
        try:
            fail_orphaned_trials(self.study, self._storage, self._experiment_name, live, reason)
        except Exception as exc:
            logger.warning("Could not check the Optuna study for orphaned trials: %s", exc)


class NonFiniteLastASHA(ASHAScheduler):
    """ASHA on the intermediate objective (time: evaluations done) where a NaN objective (a model
    that detects nothing) is the worst, and a trial at ``last_step`` (its last evaluation) always
    finishes. Ray's ASHA would never stop a NaN trial (``NaN < cutoff`` is false); stopping a
    trial at its last evaluation saves nothing and would record a fully trained trial as pruned."""

    def __init__(self, last_step: int, *, time_attr: str, metric: str, mode: str, **kwargs) -> None:
        super().__init__(time_attr=time_attr, metric=metric, mode=mode, **kwargs)
        self.last_step = int(last_step)
        self.step_key = time_attr
        self.worst = -math.inf if mode == "max" else math.inf

    def _fixed(self, result: dict) -> dict:
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isnan(float(value)):
            result = {**result, self.metric: self.worst}
        return result

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        step = result.get(self.step_key)
        if isinstance(step, int | float) and step >= self.last_step:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, self._fixed(result))

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, self._fixed(result))


def build_scheduler(
    kind: str, total_evaluations: int, grace_period: int = 1, reduction_factor: int = 2
) -> TrialScheduler:
    """The search's early stopping: ``asha`` (:class:`NonFiniteLastASHA`) or ``fifo`` (none);
    ``total_evaluations`` of a complete trial."""
    kind = kind.lower()
    if kind == "fifo":
        return FIFOScheduler()
    if kind != "asha":
        raise ValueError(f"unknown scheduler {kind!r}: use asha or fifo")
    if total_evaluations < 2:
        logger.warning("A trial evaluates only once: ASHA cannot stop any trial early (lower TEST.EVAL_PERIOD)")
    # max_t beyond the last evaluation: a trial that reaches it is complete, never "stopped".
    return NonFiniteLastASHA(
        last_step=total_evaluations,
        time_attr=STEP_KEY,
        metric="objective",
        mode="max",
        max_t=total_evaluations + 1,
        grace_period=max(1, grace_period),
        reduction_factor=max(2, reduction_factor),
    )
