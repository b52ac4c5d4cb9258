"""The driver's MLflow writer: the search's parent run, and the final state of every trial run.

One parent run per search (tags ``kind=search``, ``search_name``: the settings as params, at the
end the ranked table, the best configuration and Optuna's figures) and one child run per trial,
created when the searcher suggests it (:mod:`eqlv2.search.mlflow_trial_run`; a reference trial's
by its trial process) and filled by its rank-0 workers. :class:`SearchTracking` alone writes a
trial run's final state, since only the driver knows why a trial ended: completed (``FINISHED``),
stopped by the scheduler (``KILLED``, ``stopped_early``), failed (``FAILED``, the error as tag and
``error.txt``) or cut short by an interrupted driver (``KILLED``, ``interrupted``). It closes the
run its trial's config names; in a resumed search, or for a reference trial, it finds the run
by its tags, on the server and in the outbox.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray.tune import Callback

from .mlflow_client import (
    PARENT_TAG,
    SEARCH_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    first_line,
    prepare_tracking_store,
    tag_experiment_for_training,
)
from .mlflow_outbox import DurableMlflow, ReplayReport, outbox_report
from .plots import optuna_history_figure, optuna_importance_figure
from .settings import RUN_ID_KEY

logger = logging.getLogger(__name__)

#: Final state of a trial run by the trial's status in the search: (tag trial_status, run status).
FINAL_STATES = {
    "complete": ("completed", "FINISHED"),
    "pruned": ("stopped_early", "KILLED"),
    "failed": ("failed", "FAILED"),
    "running": ("interrupted", "KILLED"),
}


def _error_text(trial) -> str:
    error = trial.get_error()
    if error is not None:
        return str(error)
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()[-20000:]
    return "unknown error (see the Ray Tune trial folder)"


def error_summary(text: str) -> str:
    """The message of the trial's own error (``TrialFailedError``), else the last line of ``text``."""
    marker = "TrialFailedError: "
    if marker in text:
        return text[text.rindex(marker) + len(marker) :].strip()[:4000]
    lines = text.strip().splitlines()
    return lines[-1][:4000] if lines else text


def close_stale_child_runs(mlflow: DurableMlflow, experiment_id: str, parent_run_id: str, status: str) -> int:
    """Closes ``KILLED`` the child runs an interrupted driver left open; returns how many."""
    stale = [run for run in mlflow.find_runs(experiment_id, {PARENT_TAG: parent_run_id}) if run.open]
    for run in stale:
        mlflow.set_tags(run.ref, {STATUS_TAG: status})
        mlflow.terminate(run.ref, "KILLED")
    if stale:
        logger.info("Closed %d trial run(s) left open by the interrupted search", len(stale))
    return len(stale)


class SearchTracking(Callback):
    """Tune callback on the driver, and the driver's only MLflow writer (see the module docstring);
    ``outbox_root`` is the search's outbox folder (``<results dir>/mlflow_outbox``)."""

    def __init__(
        self, tracking_uri: str, experiment_id: str, parent_run_id: str, outbox_root: str | os.PathLike, resumed: bool = False
    ) -> None:
        self.tracking_uri = tracking_uri
        self.resumed = resumed
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.outbox_root = str(Path(outbox_root).expanduser().resolve())
        self.started = time.time()
        self.outbox_state: ReplayReport | None = None
        self.mlflow = DurableMlflow.on_node(tracking_uri, self.outbox_root)

    @classmethod
    def open(cls, uri: str, experiment: str, artifact_root: Path, name: str, parent_run_id: str | None, outbox_root: Path) -> SearchTracking | None:
        """The tracking of search ``name``: its parent run created, or reopened on resume; None when
        the store is unreachable."""
        try:
            experiment_id = prepare_tracking_store(uri, experiment, artifact_root)
        except Exception as error:  # the never-raise guard: an untracked search still runs
            logger.warning(
                "MLflow tracking store %s is unreachable (%s: %s): this search is NOT tracked in MLflow; "
                "results stay in the Tune folder and the Optuna study.", uri, type(error).__name__, first_line(error),
            )  # fmt: skip
            return None
        mlflow = DurableMlflow.on_node(uri, outbox_root)
        # MLflow's UI opens an experiment without a kind on its GenAI pages: mark it as training.
        mlflow.call("tagging the experiment", lambda c: tag_experiment_for_training(c, experiment_id))
        resumed = bool(parent_run_id)
        if resumed:
            mlflow.reopen(parent_run_id, {SEARCH_TAG: name, "kind": "search"})
            close_stale_child_runs(mlflow, experiment_id, parent_run_id, "interrupted")
        else:
            parent_run_id = mlflow.create_run(experiment_id, name, {SEARCH_TAG: name, "kind": "search"})
        return cls(uri, experiment_id, parent_run_id, outbox_root, resumed=resumed) if parent_run_id else None

    def _close(self, run_id: str, status: str, metrics: Mapping[str, Any], error: str | None) -> None:
        tag, run_status = FINAL_STATES[status]
        tags = {STATUS_TAG: tag}
        if error is not None:
            tags["error"] = error_summary(error)
            self.mlflow.log_text(run_id, error, "error.txt")
        step = metrics.get("eval_step", 0)
        step = int(step) if isinstance(step, int | float) and math.isfinite(step) else 0
        objectives = {k: v for k, v in metrics.items() if k == "objective" or k.endswith("/objective")}
        self.mlflow.log_batch(run_id, metrics=objectives, step=step, tags=tags)
        self.mlflow.terminate(run_id, run_status)

    def _close_trial(self, trial, status: str, error: str | None = None) -> None:
        run_id = (trial.config or {}).get(RUN_ID_KEY)
        if run_id and not self.resumed:  # created for this trial by this driver, open until now
            self._close(run_id, status, dict(trial.last_result or {}), error)
            return
        runs = self.mlflow.find_runs(self.experiment_id, {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id})
        for run in runs:
            if run.open:
                self._close(run.ref, status, dict(trial.last_result or {}), error)
        if not runs:
            logger.info("No MLflow run found for trial %s (%s)", trial.trial_id, status)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._close_trial(trial, "complete" if (trial.last_result or {}).get("trial_complete") else "pruned")

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._close_trial(trial, "failed", _error_text(trial))

    def close_open_runs(self, statuses: Mapping[str, str]) -> None:
        """Replays the outbox, then closes the runs still open by their trial's status (``statuses``:
        Tune trial id → status), e.g. a run whose create call was in flight when its trial ended."""
        self.mlflow.flush()
        for run in self.mlflow.find_runs(self.experiment_id, {PARENT_TAG: self.parent_run_id}):
            if run.open:
                status = statuses.get(run.tags.get(TRIAL_TAG, ""), "running")
                self._close(run.ref, status, {}, None if status != "failed" else "see the Ray Tune trial folder")

    def log_start(self, params: Mapping[str, Any], files: Mapping[str, str]) -> None:
        """The search's settings (params) and ``{artifact name: text}`` on the parent run."""
        self.mlflow.log_params(self.parent_run_id, params)
        self._log_texts(files)

    def _log_texts(self, texts: Mapping[str, str]) -> None:
        for artifact_file, text in texts.items():
            self.mlflow.log_text(self.parent_run_id, text, artifact_file)

    def log_optuna_figures(self, study, target_name: str, min_importance_trials: int = 2) -> None:
        """Optuna's optimisation history and parameter importance on the parent run."""
        for file, figure in (
            ("optuna_param_importance.png", optuna_importance_figure(study, target_name, min_importance_trials)),
            ("optuna_history.png", optuna_history_figure(study, target_name)),
        ):
            if figure is not None:
                self.mlflow.log_figure(self.parent_run_id, figure, f"optuna/{file}")

    def finish(self, files: Sequence[Path], texts: Mapping[str, str], metrics: Mapping[str, Any], tags: Mapping[str, Any], interrupted: bool) -> None:
        """Logs the outcome on the parent run and closes it (``KILLED`` if the search was interrupted)."""
        for path in files:
            self.mlflow.log_artifact(self.parent_run_id, path)
        self._log_texts(texts)
        self.mlflow.log_metrics(self.parent_run_id, metrics, step=0)
        self.mlflow.set_tags(self.parent_run_id, {**tags, "search_status": "interrupted" if interrupted else "finished"})
        self.mlflow.terminate(self.parent_run_id, "KILLED" if interrupted else "FINISHED")
        self.mlflow.flush()
        self.outbox_state = outbox_report(self.outbox_root, self.started)
        if self.outbox_state.pending:
            logger.warning("%s, kept in %s", self.outbox_state.summary(), self.outbox_root)
