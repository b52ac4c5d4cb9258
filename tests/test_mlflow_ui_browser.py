"""The MLflow UI, in a real headless Chromium, shows a search's trials ready to compare.

A real ``mlflow server`` holds an experiment with a parent run and three trial runs (params
gamma/mu/alpha, metrics AP/APr/APc/APf/objective), logged with ``MlflowClient``; Debian's
``chromium --headless --dump-dom`` renders the link :func:`experiment_url` gives. The UI is a
React app served at ``/`` with hash routes (``#/experiments/<id>/runs``); ``--virtual-time-budget``
lets it fetch the runs and render before the DOM is dumped (virtual time waits for pending
network fetches, so a slow machine only makes it slower).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html import unescape

import pytest

from mlflow_server import MlflowServer  # isort: skip (before mlflow: switches its telemetry off)
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from eqlv2.search.mlflow_client import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    experiment_url,
    tag_experiment_for_training,
)

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install -y chromium chromium-driver)",
)

#: Trials: name → (gamma, mu, alpha, objective); the table must rank them by objective.
TRIALS = {
    "trial-a-g12": (12.0, 0.8, 4.0, 21.5),
    "trial-b-g6": (6.0, 0.6, 2.0, 17.25),
    "trial-c-g15": (15.0, 0.9, 7.0, 23.0),
}


def page_text(url: str, budget_ms: int = 20000) -> str:
    """The text of the page at ``url`` once rendered by headless Chromium (tags stripped)."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", done.stdout, flags=re.S)
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", text)))


@pytest.fixture(scope="module")
def search_experiment(tmp_path_factory):
    """A server with one search: a parent run and the trials of :data:`TRIALS` as child runs."""
    server = MlflowServer(tmp_path_factory.mktemp("ui"))
    server.start()
    try:
        client = MlflowClient(server.uri)
        experiment = client.create_experiment("eqlv2-search")
        parent = client.create_run(experiment, run_name="search-parent").info.run_id
        for name, (gamma, mu, alpha, objective) in TRIALS.items():
            run = client.create_run(
                experiment, run_name=name, tags={"mlflow.parentRunId": parent}
            ).info.run_id
            params = [Param(k, str(v)) for k, v in (("gamma", gamma), ("mu", mu), ("alpha", alpha))]
            values = {
                "AP": objective,
                "APr": objective - 9,
                "APc": objective - 2,
                "APf": objective + 3,
            }
            metrics = [Metric(k, v, 0, 80) for k, v in {**values, "objective": objective}.items()]
            client.log_batch(run, metrics=metrics, params=params)
            client.set_terminated(run)
        client.set_terminated(parent)
        yield server, client, experiment
    finally:
        server.stop()


def test_experiment_tagged_as_model_training(search_experiment):
    _, client, experiment = search_experiment
    assert tag_experiment_for_training(client, experiment)
    assert tag_experiment_for_training(client, experiment)  # idempotent
    assert client.get_experiment(experiment).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    chosen = client.create_experiment(
        "chosen-by-user", tags={EXPERIMENT_KIND_TAG: "genai_development"}
    )
    assert not tag_experiment_for_training(client, chosen)  # the user's choice is kept
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_runs_table_lists_trials_ranked_by_objective(search_experiment):
    server, _, experiment = search_experiment
    text = page_text(experiment_url(server.uri, experiment))
    assert "Model registry" in text and "Observability" not in text, "not the machine-learning view"
    positions = [text.find(name) for name in TRIALS]
    assert all(p >= 0 for p in positions), f"trial runs missing from the runs table: {text[:3000]}"
    ranked = sorted(TRIALS, key=lambda name: -TRIALS[name][3])
    assert sorted(TRIALS, key=text.find) == ranked
    assert text.find(ranked[-1]) < text.find("search-parent")  # the parent has no objective: last


def test_default_order_folds_the_trials_under_the_parent(search_experiment):
    """Why the link sorts: in the UI's default order the trials are hidden under their parent."""
    server, _, experiment = search_experiment
    text = page_text(experiment_url(server.uri, experiment, rank_by=None))
    assert "search-parent" in text and "4 matching runs" in text
    assert not any(name in text for name in TRIALS)
