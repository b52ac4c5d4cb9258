"""The MLflow UI opened on a search, ready to compare trials.

MLflow 3.17's UI shows an experiment either as "GenAI apps & agents" or as "Machine learning" (the
runs table). Older UIs read the kind from the experiment tag ``mlflow.experimentKind``
(:func:`tag_experiment_for_training`, at driver start); 3.17 reads the browser's *workflow type*,
which the link's ``workflowType=machine_learning`` sets (:func:`experiment_url`). Checked in a
real browser by ``tests/test_mlflow_ui_browser.py``.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

logger = logging.getLogger(__name__)

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
