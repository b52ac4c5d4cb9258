"""A search on the cluster's stores: the Optuna study in PostgreSQL, the runs on an MLflow tracking
server backed by PostgreSQL, two trials at once; the driver is killed mid-search and the same
command with ``--resume`` finishes it.

Exactly as a user runs it: ``tune/search.py --optuna-storage postgresql://... --mlflow-uri
http://127.0.0.1:PORT --concurrency 2``, the password only in ``PGPASSWORD``. Afterwards every
trial is COMPLETE once in the study, each has one finished MLflow run (an interrupted attempt is
closed as KILLED), nothing is RUNNING, and two trials did train at the same time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pg_fixtures import mlflow_server, postgres  # noqa: F401

pytest.importorskip("ray")
optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")
from eqlv2.search.optuna_study import open_storage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _trials(storage) -> list:
    """The study's trials, read through the test's one storage (``_reader``)."""
    try:
        (summary,) = optuna.get_all_study_summaries(storage=storage)
    except ValueError:  # no study yet
        return []
    return optuna.load_study(study_name=summary.study_name, storage=storage).trials


def _reader(url: str):
    """One storage for all of the test's reads, its tables created before the search starts.

    Not a new storage per poll: each one's pooled connections stay open until the garbage
    collector finds its engine, and in a long test session (a lazy collector) they exhausted
    PostgreSQL's ``max_connections``: the next storage opened, the driver's or a trial's, then
    failed with ``StorageInternalError`` (the flake of earlier runs).
    """
    return open_storage(url)


def _runs(tracking_uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("eqlv2-search")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def _search_command(runs: Path, postgres, tracking_uri: str) -> list[str]:  # noqa: F811
    return [
        sys.executable, str(ROOT / "tune/search.py"), "--smoke", "--num-trials", "3", "--scheduler", "fifo", "--baseline", "none", "--noise-seeds", "0",
        "--concurrency", "2", "--workers-per-trial", "1", "--results-dir", str(runs), "--name", "on_postgres",
        "--optuna-storage", postgres.url("optuna"), "--mlflow-uri", tracking_uri,
        "SOLVER.MAX_ITER", "6", "TEST.EVAL_PERIOD", "0", "MODEL.EQLV2.LOG_PERIOD", "3",
    ]  # fmt: skip


#: Ray's own start-up limit (30 s for the raylet to register), exceeded on an overloaded machine.
RAY_STARTUP_TIMEOUT = "The current node timed out during startup"


def _kill_once_a_trial_is_complete(proc: subprocess.Popen, storage, tracking_uri: str, log: Path) -> bool:
    """Waits until one trial is COMPLETE and another is training, then SIGKILLs the driver.

    Returns False when the driver exited because Ray itself did not start in time (retry).
    """
    deadline = time.monotonic() + 1200  # generous: a loaded 2-core machine trains slowly
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            assert RAY_STARTUP_TIMEOUT in log.read_text() and not _trials(storage), log.read_text()[-4000:]
            return False
        states = [t.state.name for t in _trials(storage)]
        open_runs = [r for r in _runs(tracking_uri) if r.info.status == "RUNNING" and "tune_trial_id" in r.data.tags]
        if "COMPLETE" in states and "RUNNING" in states and open_runs:
            time.sleep(6)  # Tune checkpoints its experiment every few seconds
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return True
        time.sleep(2)
    pytest.fail("no trial completed in time")


def _start_and_interrupt(command: list[str], cwd: Path, env: dict, storage, tracking_uri: str) -> None:
    """Runs the search until it is half done, then kills it (at most 3 tries of Ray's start)."""
    for attempt in range(3):
        log = cwd / f"first{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                if _kill_once_a_trial_is_complete(proc, storage, tracking_uri, log):
                    return
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # anything left in the driver's session
                except ProcessLookupError:
                    pass
        shutil.rmtree(cwd / "runs", ignore_errors=True)
    pytest.fail("Ray did not start in three tries")


@pytest.mark.slow
def test_concurrent_search_on_postgres_and_mlflow_server_resumes(postgres, mlflow_server, tmp_path, monkeypatch):  # noqa: F811
    runs = tmp_path / "runs"
    command = _search_command(runs, postgres, mlflow_server)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PGPASSWORD=postgres.env["PGPASSWORD"])
    env.setdefault("EQLV2_SYNTHETIC_ROOT", str(ROOT / "datasets" / "eqlv2_synthetic"))
    monkeypatch.setenv("PGPASSWORD", postgres.env["PGPASSWORD"])  # for this process's own reads
    storage = _reader(postgres.url("optuna"))
    _start_and_interrupt(command, tmp_path, env, storage, mlflow_server)

    for _ in range(3):
        resumed = subprocess.run(
            [*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500,
            start_new_session=True,
        )  # fmt: skip
        if resumed.returncode == 0 or RAY_STARTUP_TIMEOUT not in resumed.stderr:
            break
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]

    trials = _trials(storage)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    trial_ids = [t.user_attrs["tune_trial_id"] for t in trials]
    assert len(set(trial_ids)) == 3  # none lost, none counted twice
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), f"no two trials overlapped: {spans}"

    found = _runs(mlflow_server)
    assert all(r.info.status != "RUNNING" for r in found)
    (parent,) = [r for r in found if r.data.tags.get("kind") == "search"]
    assert parent.info.status == "FINISHED"
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    finished = sorted(r.data.tags["tune_trial_id"] for r in children if r.info.status == "FINISHED")
    assert finished == sorted(trial_ids)  # one finished run per trial
    assert {r.data.tags["trial_status"] for r in children if r.info.status != "FINISHED"} <= {"interrupted"}
    for run in children:
        if run.info.status == "FINISHED":
            assert run.data.tags["trial_status"] == "completed" and "objective" in run.data.metrics
