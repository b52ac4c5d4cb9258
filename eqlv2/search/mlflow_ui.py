"""The MLflow UI opened on a search, ready to compare trials.

MLflow 3.17's UI (read in its bundled JavaScript, ``mlflow/server/js/build/static/js``) has two
kinds of experiment pages: "GenAI apps & agents" (traces, sessions) and "Machine learning" (the
runs table, charts, parallel coordinates). Which one it shows comes from two places:

* the experiment tag ``mlflow.experimentKind`` (values ``genai_development`` and
  ``custom_model_development``, shown as "Machine learning"), which the UI's own kind selector
  writes; older 3.x UIs, and this one when its workflow feature flag is off, read the page kind
  from it;
* in 3.17, with that flag on, the *workflow type* of the browser: the URL parameter
  ``workflowType=machine_learning`` (or ``genai``), else the value saved in the browser's local
  storage (``mlflow.workflowType``), else GenAI.

So a search does both: :func:`tag_experiment_for_training` at driver start, and
:func:`experiment_url` for the link it prints (the runs table, in machine-learning mode, sorted by
the objective so that the trials are listed flat and ranked). Checked in a real browser by
``tests/test_mlflow_ui_browser.py``: in 3.17 the tag alone leaves ``#/experiments/<id>`` on the
GenAI overview; the link's ``workflowType`` is what opens the runs table.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "MODEL_TRAINING_KIND",
    "experiment_url",
    "tag_experiment_for_training",
]

logger = logging.getLogger(__name__)

#: The experiment tag the MLflow UI reads the experiment's kind from.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: Its value for model training ("Machine learning" in the UI).
MODEL_TRAINING_KIND = "custom_model_development"


def tag_experiment_for_training(client, experiment_id: str) -> bool:
    """Tags the experiment as model training unless it already has a kind; never raises.

    Args:
        client: an ``mlflow.MlflowClient``.
        experiment_id: the search's experiment.

    Returns:
        Whether the experiment now carries :data:`MODEL_TRAINING_KIND` (False if the user chose
        another kind in the UI, which is kept, or if MLflow failed).
    """
    try:
        current = client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG)
        if current is None:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
            current = MODEL_TRAINING_KIND
    except Exception as error:
        logger.warning(
            "Could not tag MLflow experiment %s as model training: %s", experiment_id, error
        )
        return False
    return current == MODEL_TRAINING_KIND


def experiment_url(ui_base: str, experiment_id: str, rank_by: str | None = "objective") -> str:
    """The link to an experiment's runs table in machine-learning mode, trials ranked.

    The runs table folds child runs under their parent while it is sorted by date (its default);
    sorted by a metric it lists every run flat. So the link sorts by ``rank_by`` (descending):
    the trials of the search come first, best first, each with its params and metrics.

    Args:
        ui_base: where the UI is served (``http://127.0.0.1:5000``), without credentials.
        experiment_id: the experiment.
        rank_by: metric to sort by (the search's ``objective``); None keeps the UI's default.
    """
    url = f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if rank_by:
        url += "&orderByKey=" + quote(f"metrics.`{rank_by}`", safe="") + "&orderByAsc=false"
    return url
