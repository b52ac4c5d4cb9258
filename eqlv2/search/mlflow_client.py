"""The one door to MLflow: a client whose calls never raise, and the search's tracking store.

Every MLflow call of a search (driver, trial, rank-0 worker) goes through :class:`SafeMlflow`:
when the store is unreachable, training and the search go on and a warning says what was not
logged. What each process writes is in :mod:`eqlv2.search.mlflow_driver` (the parent run, and
every trial's final state) and :mod:`eqlv2.search.mlflow_worker` (a trial's metrics and
artifacts, from its rank-0 worker).

Child runs name their parent with MLflow's ``mlflow.parentRunId`` tag, set at creation through
``MlflowClient``: the fluent ``mlflow.start_run(parent_run_id=...)`` would make the run the
process's active run, which MLflow ends (``FINISHED``) when the process exits, so the trial
process would become a second writer of the run's final state.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from .stores import is_local_uri

logger = logging.getLogger(__name__)

__all__ = ["PARENT_TAG", "ROLE_TAG", "SEARCH_TAG", "STATUS_TAG", "TRIAL_TAG", "SafeMlflow", "prepare_tracking_store", "ui_command"]

PARENT_TAG = MLFLOW_PARENT_RUN_ID
TRIAL_TAG = "tune_trial_id"
STATUS_TAG = "trial_status"
SEARCH_TAG = "search_name"
#: What a trial run is: ``search`` (a trial of the search), ``baseline`` or ``noise`` (a reference).
ROLE_TAG = "trial_role"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this tracking store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the tracking server's own UI)"
    return f"mlflow ui --backend-store-uri {uri}"


def prepare_tracking_store(uri: str, experiment: str, artifact_root: str | os.PathLike | None) -> str:
    """Creates the tracking database (once, by the driver: two processes creating a SQLite MLflow
    database at once crash) and the experiment; returns the experiment's id.

    Args:
        uri: the tracking URI.
        experiment: experiment name.
        artifact_root: artifact folder of a local store (absolute, so that Ray workers with
            another working directory write to the same place); None lets the server decide.

    Raises:
        Exception: whatever MLflow raises when the store is unreachable.
    """
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None
    if artifact_root is not None and is_local_uri(uri):
        root = Path(artifact_root).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    return client.create_experiment(experiment, artifact_location=location)


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:300] if str(error) else ""


class SafeMlflow:
    """An ``MlflowClient`` whose calls never raise.

    A failed call is logged as a warning naming what was not logged; after a failure, calls are
    skipped (and counted) for ``retry_after`` seconds so that an unreachable server does not stall
    training with its retries; then the next call tries again.
    """

    def __init__(self, tracking_uri: str, retry_after: float = 30.0) -> None:
        self.tracking_uri = tracking_uri
        self.retry_after = retry_after
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._down_since: float | None = None
        self._lock = threading.Lock()
        #: what was not logged: description → number of calls.
        self.dropped: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "retry_after": self.retry_after}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def available(self) -> bool:
        """False while calls are being skipped after a failure."""
        return self._down_since is None or time.monotonic() - self._down_since >= self.retry_after

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(client, *args, **kwargs)``, or None (and a warning) if MLflow fails."""
        with self._lock:
            if not self.available:
                self.dropped[what] = self.dropped.get(what, 0) + 1
                return None
            try:
                result = fn(self.client, *args, **kwargs)
            except Exception as error:  # the never-raise guard: tracking must not stop training
                self.dropped[what] = self.dropped.get(what, 0) + 1
                self._down_since = time.monotonic()
                logger.warning(
                    "MLflow at %s failed; not logged: %s (%s: %s). Results stay in the Ray Tune "
                    "results and the Optuna study; MLflow calls pause for %.0f s.",
                    self.tracking_uri, what, type(error).__name__, _first_line(error), self.retry_after,
                )  # fmt: skip
                return None
            if self._down_since is not None:
                logger.warning("MLflow at %s reachable again", self.tracking_uri)
                self._down_since = None
            return result

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, Any] | None = None) -> str | None:
        """Creates a RUNNING run; returns its id or None."""
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        run = self.call(f"new run {run_name!r}", lambda c: c.create_run(experiment_id, run_name=run_name, tags=tags))
        return run.info.run_id if run is not None else None

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, Any], step: int) -> None:
        """Logs the finite numeric entries of ``metrics`` at ``step``."""
        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, int(step)) for key, value in _finite_metrics(metrics).items()]
        if run_id and batch:
            self.call(f"{len(batch)} metrics at step {step} of run {run_id}", lambda c: c.log_batch(run_id, metrics=batch))

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        """Logs params (values as text, cut to MLflow's limit)."""
        batch = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        if run_id and batch:
            self.call(f"params {sorted(params)} of run {run_id}", lambda c: c.log_batch(run_id, params=batch))

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        """Sets tags (values as text)."""
        batch = [RunTag(str(k), str(v)[:5000]) for k, v in tags.items()]
        if run_id and batch:
            self.call(f"tags {sorted(tags)} of run {run_id}", lambda c: c.log_batch(run_id, tags=batch))

    def log_artifact(self, run_id: str | None, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Uploads one file."""
        if run_id:
            self.call(f"artifact {Path(path).name} of run {run_id}", lambda c: c.log_artifact(run_id, str(path), artifact_path))

    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        """Uploads ``text`` as the artifact ``artifact_file``."""
        if run_id:
            self.call(f"artifact {artifact_file} of run {run_id}", lambda c: c.log_text(run_id, text, artifact_file))

    def log_figure(self, run_id: str | None, figure, artifact_file: str) -> None:
        """Uploads a matplotlib figure as the image ``artifact_file``."""
        if run_id:
            self.call(f"figure {artifact_file} of run {run_id}", lambda c: c.log_figure(run_id, figure, artifact_file))

    def terminate(self, run_id: str | None, status: str) -> None:
        """Closes a run with ``status`` (FINISHED, FAILED or KILLED)."""
        if run_id:
            self.call(f"status {status} of run {run_id}", lambda c: c.set_terminated(run_id, status))

    def find_child_runs(self, experiment_id: str, parent_id: str, trial_id: str | None = None) -> list:
        """Child runs of ``parent_id`` (of one Tune trial if ``trial_id``), newest first; [] on failure."""
        query = f"tags.`{PARENT_TAG}` = '{parent_id}'" + (f" and tags.{TRIAL_TAG} = '{trial_id}'" if trial_id else "")
        runs = self.call(
            f"search of the child runs of {parent_id}",
            lambda c: c.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1000),
        )
        return list(runs or [])

    def warn_dropped(self, context: str) -> None:
        """One warning summarising everything that was not logged."""
        if self.dropped:
            logger.warning(
                "%s: %d MLflow call(s) were not logged (e.g. %s). The Ray Tune results and the "
                "Optuna study hold the trial results.",
                context, sum(self.dropped.values()), "; ".join(list(self.dropped)[:5]),
            )  # fmt: skip
