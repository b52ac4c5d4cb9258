"""An MLflow outage during a real search loses no record (issue 12, first point).

A real ``mlflow server`` subprocess (:mod:`mlflow_server`) and a real smoke search
(``tune/search.py --smoke``, two trials of 6 iterations, one Ray Train worker each) as a
subprocess; the server is stopped once the search has written to it:

* stopped once the first trial has logged its first training point, restarted 45 s later while
  the search goes on: the rest of that trial (its last points, evaluation, artifacts, and the
  driver's final state) waits in the outbox; the search replays it itself, exits 0 and says what
  it replayed;
* stopped once the parent run exists, before any trial run, and kept down until the search
  ends: the trials' runs exist only as outbox placeholders; the search exits 3 and names the
  pending calls and the ``--sync`` command; after the restart, ``tune/search.py --sync`` replays
  them and exits 0.

Either way, read back with ``MlflowClient``: every trial's child run exists once, with its
params, its metric history, its artifacts and its final state from the driver; no run is left
RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlflow_server import MlflowServer  # isort: skip (before mlflow: switches its telemetry off)

pytest.importorskip("ray")
pytest.importorskip("optuna")
from mlflow import MlflowClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Two trials of 6 iterations and one evaluation (FIFO: both complete), one worker, logs every 3;
#: no reference trials.
SEARCH = [
    "--smoke", "--num-trials", "2", "--scheduler", "fifo", "--concurrency", "1", "--workers-per-trial", "1", "--baseline", "none",
    "--noise-seeds", "0",
    "SOLVER.MAX_ITER", "6", "TEST.EVAL_PERIOD", "0", "MODEL.EQLV2.LOG_PERIOD", "3",
]  # fmt: skip
EXPERIMENT = "eqlv2-search"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("EQLV2_SYNTHETIC_ROOT", str(ROOT / "datasets" / "eqlv2_synthetic"))
    return env


def _search_cli(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """``tune/search.py`` in its own session, stdout and stderr to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "tune/search.py"), *args],
            cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:  # the search's session (its Ray cluster included) goes with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _runs(uri: str, **tags: str) -> list:
    """Runs of the search's experiment carrying ``tags`` ([] while there is none or no server)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()) or ""
    return [r for r in client.search_runs([experiment.experiment_id], query) if all(k in r.data.tags for k in tags)]


def _wait_for(proc: subprocess.Popen, log: Path, uri: str, tag: str, metric: str | None = None, timeout: float = 900) -> None:
    """Waits until a run carrying ``tag`` (and holding ``metric``) exists on the server."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        with contextlib.suppress(Exception):
            if any(tag in r.data.tags and (metric is None or metric in r.data.metrics) for r in _runs(uri)):
                return
        time.sleep(0.5)
    pytest.fail(f"no run tagged {tag} with {metric} within {timeout} s: {log.read_text()[-3000:]}")


def _check_runs(uri: str) -> None:
    """The parent and both trial runs are complete, and nothing is RUNNING."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "search"]
    assert parent.info.status == "FINISHED"
    assert {"ranked_trials.csv", "summary.txt"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len({r.data.tags["tune_trial_id"] for r in children}) == len(children) == 2
    for run in children:
        run_id = run.info.run_id
        assert (run.info.status, run.data.tags["trial_status"]) == ("FINISHED", "completed")
        assert {"gamma", "mu", "alpha", "datasets", "seed"} <= set(run.data.params)
        losses = client.get_metric_history(run_id, "lvis/total_loss")
        assert sorted(m.step for m in losses) == [3, 6], [(m.step, m.value) for m in losses]
        assert [m.step for m in client.get_metric_history(run_id, "lvis/AP")] == [6]
        assert "objective" in run.data.metrics
        files = {a.path for a in client.list_artifacts(run_id, "weight_norms")}
        assert files == {"weight_norms/lvis.csv", "weight_norms/lvis.png"}
        grads = {a.path for a in client.list_artifacts(run_id, "gradient_statistics/lvis")}
        assert "gradient_statistics/lvis/iter_0000006.csv" in grads


def _replayed(text: str) -> int:
    """Calls the search's summary says were replayed."""
    match = re.search(r"MLflow outbox: replayed (.*?); (\d+) call\(s\) pending; \d+ rejected \(outbox", text)
    assert match, text[-3000:]
    return sum(int(n) for n in re.findall(r"(\d+) \w+", match.group(1)))


@pytest.mark.slow
def test_server_stopped_and_restarted_during_the_search(tmp_path):
    server = MlflowServer(tmp_path / "server")
    server.start()
    log = tmp_path / "search.log"
    try:
        proc = _search_cli([*SEARCH, "--results-dir", str(tmp_path / "runs"), "--name", "outage", "--mlflow-uri", server.uri], tmp_path, log)
        # The first trial's run (the driver creates it before the trial starts; without an
        # evaluation, its rank-0 worker sends the deferred points after training).
        _wait_for(proc, log, server.uri, "tune_trial_id")
        server.stop()
        stopped = time.monotonic()
        time.sleep(45)
        server.start()
        print(f"server down for {time.monotonic() - stopped:.0f} s")
        code = _finish(proc, timeout=1500)
        out = log.read_text()
        assert code == 0, out[-5000:]
        assert _replayed(out) > 0 and "; 0 call(s) pending" in out, out[-3000:]
        assert "workflowType=machine_learning" in out  # the experiment's UI link
        _check_runs(server.uri)
        assert not list((tmp_path / "runs/mlflow_outbox").glob("*/blobs/*/*")), "artifact copies left"
    finally:
        server.stop()


@pytest.mark.slow
def test_server_down_until_the_end_then_sync(tmp_path):
    server = MlflowServer(tmp_path / "server")
    server.start()
    log, runs = tmp_path / "search.log", tmp_path / "runs"
    try:
        proc = _search_cli([*SEARCH, "--results-dir", str(runs), "--name", "down", "--mlflow-uri", server.uri], tmp_path, log)
        _wait_for(proc, log, server.uri, "kind")  # the parent run
        server.stop()
        code = _finish(proc, timeout=1500)
        out = log.read_text()
        assert code == 3, out[-5000:]
        pending = int(re.search(r"MLflow is missing (\d+) call\(s\) of this search", out).group(1))
        assert pending > 10 and f"--sync --results-dir {runs.resolve()}" in out

        server.start()
        synced = subprocess.run(
            [sys.executable, str(ROOT / "tune/search.py"), "--sync", "--results-dir", str(runs)],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert synced.returncode == 0, synced.stdout[-3000:] + synced.stderr[-3000:]
        assert f"{pending} MLflow call(s) pending" in synced.stdout
        assert f"replayed {pending}/{pending}" in synced.stdout and "; 0 call(s) pending" in synced.stdout
        _check_runs(server.uri)
    finally:
        server.stop()
