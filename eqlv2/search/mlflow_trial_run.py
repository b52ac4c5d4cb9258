"""A trial's MLflow run: created with its tags and params before the trial trains.

Who creates it: the driver, when the searcher suggests the trial (:class:`TrialRunCreator`, the
searcher's ``on_suggest``), and the id travels in the trial's config (:data:`RUN_ID_KEY`). So a
search trial's process never imports MLflow (1.2 s of CPU per process, most of it
``mlflow.genai``, which MLflow 3 always imports). A reference trial (no searcher) and a trial of
a resumed search (which reopens the run of its first attempt) start their run themselves
(:func:`start_trial_run`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .mlflow_client import PARENT_TAG, ROLE_TAG, SEARCH_TAG, STATUS_TAG, TRIAL_TAG
from .mlflow_outbox import DurableMlflow
from .optuna_study import TRIAL_NUMBER_KEY
from .references import TrialSetup, trial_setup
from .settings import RUN_ID_KEY, TrialSettings

logger = logging.getLogger(__name__)


def trial_mlflow(settings: TrialSettings) -> DurableMlflow | None:
    """A client for trial runs on this node (HTTP retries kept short); None when not tracked."""
    if not settings.tracked:
        return None
    return DurableMlflow.on_node(settings.tracking_uri, settings.mlflow_outbox, short_retries=True)


def _tags(settings: TrialSettings, trial_id: str, number: Any, setup: TrialSetup) -> dict[str, Any]:
    tags = {TRIAL_TAG: trial_id, STATUS_TAG: "running", SEARCH_TAG: settings.search_name, ROLE_TAG: setup.role}
    tags["optuna_trial_number"] = number
    if settings.parent_run_id:
        tags[PARENT_TAG] = settings.parent_run_id
    return tags


def create_trial_run(mlflow: DurableMlflow, settings: TrialSettings, trial_id: str, number: Any, setup: TrialSetup) -> str | None:
    """Creates the trial's child run with its tags and params; its id (or outbox placeholder)."""
    values = setup.values
    label = setup.label or ", ".join(f"{k}={float(v):.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    run_id = mlflow.create_run(settings.experiment_id, f"{trial_id} ({label})", _tags(settings, trial_id, number, setup))
    params = {**values, **settings.run_params(setup.extra_opts), "seed": setup.seed, "objective": settings.objective.text}
    mlflow.log_params(run_id, {**params, "num_workers": settings.num_workers})
    return run_id


def start_trial_run(
    settings: TrialSettings, trial_id: str, number: Any, values: Mapping[str, Any], setup: TrialSetup | None = None
) -> str | None:
    """In the trial process: creates the trial's child run, or reopens the one a first attempt of
    this trial created (a resumed search); None when not tracked."""
    mlflow = trial_mlflow(settings)
    if mlflow is None:
        return None
    setup = setup or TrialSetup(dict(values), [], settings.seed, "search", None)
    if settings.parent_run_id and settings.resume:
        previous = mlflow.find_runs(settings.experiment_id, {PARENT_TAG: settings.parent_run_id, TRIAL_TAG: trial_id})
        if previous:
            logger.info("Trial %s continues its MLflow run %s", trial_id, previous[0].ref)
            mlflow.reopen(previous[0].ref, {**previous[0].tags, **_tags(settings, trial_id, number, setup)})
            mlflow.set_tags(previous[0].ref, {STATUS_TAG: "running"})
            return previous[0].ref
    return create_trial_run(mlflow, settings, trial_id, number, setup)


def flush_trial_outbox(settings: TrialSettings, trial_id: str) -> None:
    """Replays this node's outbox (what is left stays for the driver)."""
    mlflow = trial_mlflow(settings)
    if mlflow is not None:
        logger.info("Trial %s ended: %s", trial_id, mlflow.flush().summary())


class TrialRunCreator:
    """The searcher's ``on_suggest`` on the driver: creates a suggested trial's run and returns
    ``{RUN_ID_KEY: id}`` for its config (``{}`` when the run could not be created). Picklable
    (Tune saves the searcher): the client is opened on first use."""

    def __init__(self, settings: TrialSettings) -> None:
        self.settings = settings
        self._mlflow: DurableMlflow | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "_mlflow": None}

    def __call__(self, trial_id: str, config: Mapping[str, Any]) -> dict[str, Any]:
        if self._mlflow is None:
            self._mlflow = trial_mlflow(self.settings)
        if self._mlflow is None:
            return {}
        setup = trial_setup(config, self.settings.space, self.settings.seed)
        run_id = create_trial_run(self._mlflow, self.settings, trial_id, config.get(TRIAL_NUMBER_KEY), setup)
        return {RUN_ID_KEY: run_id} if run_id else {}
