"""Killing the search driver and running the same command with ``--resume`` finishes the search.

A real search of two tiny trials (FIFO: both must complete) is started with ``tune/search.py``;
once the first trial is complete and the second has started, the driver is killed with SIGKILL
(its Ray cluster dies with it). ``--resume`` with the same arguments must then finish the search
without training the first trial again and without queuing the seed point a second time, the
interrupted trial continuing its own MLflow run (no second run), and leave no MLflow run RUNNING.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

pytest.importorskip("ray")
optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"gamma": 12.0, "mu": 0.8, "alpha": 4.0}


def _study_written(database: Path) -> bool:
    """Whether the driver has finished creating its Optuna storage and study in ``database``.

    Read with ``sqlite3`` in read-only mode: an Optuna storage opened while the driver is still
    creating the tables would create them too (Optuna stamps Alembic's version on opening), and
    one of the two writers then fails with "table alembic_version already exists".
    """
    if not database.exists():
        return False
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as connection:
            stamped = connection.execute("SELECT count(*) FROM alembic_version").fetchone()[0]
            studies = connection.execute("SELECT count(*) FROM studies").fetchone()[0]
    except sqlite3.OperationalError:  # a table is not there yet
        return False
    return stamped > 0 and studies > 0


def _states(url: str) -> list:
    try:
        (summary,) = optuna.get_all_study_summaries(storage=url)
        return optuna.load_study(study_name=summary.study_name, storage=url).trials
    except (ValueError, KeyError):  # the study (or the database) is not there yet
        return []


def _running_runs(runs: Path) -> int:
    """Trial runs RUNNING in the search's MLflow store."""
    from mlflow import MlflowClient

    if not (runs / "mlflow.db").exists():
        return 0
    client = MlflowClient(f"sqlite:///{runs.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("eqlv2-search")
    if experiment is None:
        return 0
    found = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")
    return sum(1 for run in found if "tune_trial_id" in run.data.tags)


@pytest.mark.slow
def test_killed_driver_then_resume_finishes_the_search(tmp_path):
    runs = tmp_path / "runs"
    # Two trials of 6 iterations and one evaluation each, one Ray Train worker: the smallest
    # search with a finished trial and one to interrupt.
    args = [
        sys.executable, str(ROOT / "tune/search.py"), "--smoke", "--num-trials", "2", "--scheduler", "fifo", "--baseline", "none", "--noise-seeds", "0",
        "--concurrency", "1", "--workers-per-trial", "1", "--results-dir", str(runs), "--name", "resumable",
        "SOLVER.MAX_ITER", "6", "TEST.EVAL_PERIOD", "0", "MODEL.EQLV2.LOG_PERIOD", "3",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The offline benchmark where the project keeps it (generated once, shared by the tests).
    env.setdefault("EQLV2_SYNTHETIC_ROOT", str(ROOT / "datasets" / "eqlv2_synthetic"))
    url = f"sqlite:///{runs.resolve()}/optuna.db"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            trials = _states(url) if _study_written(runs / "optuna.db") else []
            states = [t.state.name for t in trials]
            if states == ["COMPLETE", "RUNNING"] and _running_runs(runs) == 1:
                # The second trial is training (its MLflow run is open) and Tune has recorded it
                # (experiment checkpoints every 2 s).
                time.sleep(6)
                break
            time.sleep(3)
        else:
            pytest.fail("the first trial did not complete in time")
        os.kill(first.pid, signal.SIGKILL)  # the driver only; its Ray cluster shares its fate
        first.wait(timeout=60)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # anything left in the driver's session
        except ProcessLookupError:
            pass
        log.close()

    resumed = subprocess.run(
        [*args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, start_new_session=True
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    rows = [line for line in resumed.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [row.split("|")[3].strip() for row in rows] == ["complete", "complete"]

    trials = _states(url)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert sum(t.params == PAPER for t in trials) == 1  # the seed point was not queued again

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{runs.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("eqlv2-search")
    runs_found = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs_found if r.data.tags.get("kind") == "search"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs_found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert all(r.info.status != "RUNNING" for r in runs_found)
    by_trial: dict[str, list] = {}
    for run in children:
        by_trial.setdefault(run.data.tags["tune_trial_id"], []).append(run)
    first_id = trials[0].user_attrs["tune_trial_id"]
    second_id = trials[1].user_attrs["tune_trial_id"]
    # The finished trial was not trained again: one run; the interrupted one: redone in its own run.
    assert [r.info.status for r in by_trial[first_id]] == ["FINISHED"]
    statuses = [(r.info.status, r.data.tags["trial_status"]) for r in by_trial[second_id]]
    assert statuses == [("FINISHED", "completed")]
    assert client.get_metric_history(by_trial[second_id][0].info.run_id, "lvis/total_loss")
    assert len(list((runs / "ray_results/resumable").glob("run_trial_*"))) == 2
