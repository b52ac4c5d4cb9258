"""What every MLflow writer of a search shares: tags, the tracking store, reads, HTTP limits.

Every write goes through :class:`eqlv2.search.mlflow_outbox.DurableMlflow`. Child runs name their
parent with the ``mlflow.parentRunId`` tag set at creation through ``MlflowClient``: the fluent
``mlflow.start_run(parent_run_id=...)`` would make the run the process's active run, which MLflow
ends (``FINISHED``) when the process exits, making the trial a second writer of its final state.

The MLflow UI (3.17) shows an experiment either as "GenAI apps & agents" or as "Machine learning"
(the runs table). Older UIs read the kind from the experiment tag ``mlflow.experimentKind``
(:func:`tag_experiment_for_training`, at driver start); 3.17 reads the browser's *workflow type*,
which the link's ``workflowType=machine_learning`` sets (:func:`experiment_url`). Checked in a
real browser by ``tests/test_mlflow_ui_browser.py``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from .stores import is_local_uri

logger = logging.getLogger(__name__)

PARENT_TAG = MLFLOW_PARENT_RUN_ID
TRIAL_TAG = "tune_trial_id"
STATUS_TAG = "trial_status"
SEARCH_TAG = "search_name"
#: What a trial run is: ``search`` (a trial of the search), ``baseline`` or ``noise`` (a reference).
ROLE_TAG = "trial_role"

#: MLflow's HTTP client settings in trial and rank-0 worker processes (read from ``os.environ`` at
#: every request). By default it retries a failing request for minutes: a trial must not stall on
#: a dead server, its calls go to the outbox instead.
TRIAL_HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the tracking server's own UI)"
    return f"mlflow ui --backend-store-uri {uri}"


def prepare_tracking_store(uri: str, experiment: str, artifact_root: str | os.PathLike | None) -> str:
    """Creates the tracking database (once, by the driver: two processes creating a SQLite MLflow
    database at once crash) and the experiment; returns its id. ``artifact_root`` is the artifact
    folder of a local store (made absolute for workers in other folders)."""
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


def search_tagged_runs(client: MlflowClient, experiment_id: str, tags: Mapping[str, str]) -> list:
    """The runs of ``experiment_id`` carrying every tag of ``tags``, newest first."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    return list(client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1000))


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``metrics`` as floats (NaN, infinities and text dropped)."""
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, bool | int | float) and math.isfinite(float(v))}


def first_line(error: BaseException | str) -> str:
    """The first line of an error's message (at most 300 characters), else its type's name."""
    text = str(error)
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    return text.splitlines()[0][:300]


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def tag_experiment_for_training(client, experiment_id: str) -> bool:
    """Tags the experiment as model training unless it has a kind (a user's choice is kept);
    whether it now carries :data:`MODEL_TRAINING_KIND`. Never raises."""
    try:
        current = client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG)
        if current is None:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
            current = MODEL_TRAINING_KIND
    except Exception as error:
        logger.warning("Could not tag MLflow experiment %s as model training: %s", experiment_id, error)
        return False
    return current == MODEL_TRAINING_KIND


def experiment_url(ui_base: str, experiment_id: str, rank_by: str | None = "objective") -> str:
    """The link to an experiment's runs table in machine-learning mode, sorted by ``rank_by``
    (descending): sorted by a metric, the table lists the child runs flat instead of folding them
    under their parent."""
    url = f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if rank_by:
        url += "&orderByKey=" + quote(f"metrics.`{rank_by}`", safe="") + "&orderByAsc=false"
    return url
