"""``benchmarks/search_scale.py`` with small numbers, against the real servers of the test session.

The search driver's pipeline runs 12 trials of the stand-in training run, 4 at a time, on a real
local Ray, with the Optuna study in PostgreSQL and the trial runs on an MLflow server backed by
PostgreSQL (``pg_fixtures``). The script exits 0 only if nothing was lost or doubled in either
store and every Optuna state and MLflow status matches how the trial ended in Tune; the test reads
its JSON and checks the same, and that the stand-in's failure region and ASHA produced FAIL and
PRUNED trials (the random sampler with the search's seed draws the same points every run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pg_fixtures import mlflow_server, postgres  # noqa: F401

pytest.importorskip("ray")
pytest.importorskip("optuna")
pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 12


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_search_scale_loses_and_doubles_nothing(postgres, mlflow_server, tmp_path):  # noqa: F811
    figures = tmp_path / "figures.json"
    command = [
        sys.executable, str(ROOT / "benchmarks/search_scale.py"), "--trials", str(TRIALS), "--concurrency", "4",
        "--sampler", "random", "--step-seconds", "0.2", "--results-dir", str(tmp_path / "runs"), "--json", str(figures),
        "--mlflow-uri", mlflow_server, "--optuna-storage", postgres.url("optuna"),
    ]  # fmt: skip
    env = dict(os.environ, PGPASSWORD=postgres.env["PGPASSWORD"], PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    start = time.monotonic()
    proc = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=840
    )
    output = proc.stdout[-6000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, output
    data = json.loads(figures.read_text())
    assert data["trials"] == TRIALS, output
    for count in data["counts"]:
        assert count["lost"] == 0 and count["doubled"] == 0, count
        assert count["found"] >= count["expected"] > 0, count
    assert data["state_mismatches"] == 0, output
    states = list(data["states"].values())
    assert {"COMPLETE", "PRUNED", "FAIL"} <= set(states), states
    assert data["trials_per_minute"] > 0 and data["driver_cpu_per_trial"] > 0
    print(
        f"search_scale.py with {TRIALS} trials: {time.monotonic() - start:.0f} s\n{proc.stdout[-2500:]}"
    )


def test_trial_process_imports_neither_torch_nor_detectron2():
    """What a trial process imports before its training run: the search's trial module and the
    benchmark's stand-in trial, without torch, detectron2 or Ray Train's torch support (they cost a
    trial process 9 s of CPU and 0.8 GB; a search's trial loads them in ``ray_train_run`` only),
    nor MLflow (1.2 s: the driver creates a search trial's run) or SQLAlchemy (0.25 s: a resumed
    trial's study check only)."""
    code = (
        "import sys\n"
        "import eqlv2.search.trial, scale_standin\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('torch', 'detectron2', 'torchvision', 'matplotlib', 'mlflow', 'sqlalchemy') or m == 'ray.train.torch')\n"
        "print(heavy)\n"
    )  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_floor_tracking_holds_what_a_trial_run_needs(mlflow_server):  # noqa: F811
    """``benchmarks/scale_floor.py``'s least tracking, read back from the PostgreSQL-backed
    server: a finished child run with its params, the whole metric history (a loss every 20
    iterations, the results at every evaluation) and the gradient-statistics table; so the floor
    it measures leaves out nothing the search's trial runs must hold."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mlflow import MlflowClient
    from scale_floor import EVAL_PERIOD, ITERATIONS, LOG_PERIOD, least_mlflow_trial

    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(f"floor-{time.time_ns()}")
    parent = client.create_run(experiment_id).info.run_id
    table = "category,ratio\n0,0.5\n1,0.25\n"
    run = client.get_run(least_mlflow_trial(client, experiment_id, parent, table))
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["gamma"] == "10.0" and run.data.params["objective"] == "segm/AP"
    losses = client.get_metric_history(run.info.run_id, "lvis/total_loss")
    assert sorted(m.step for m in losses) == list(range(LOG_PERIOD, ITERATIONS + 1, LOG_PERIOD))
    results = client.get_metric_history(run.info.run_id, "lvis/APr")
    assert sorted(m.step for m in results) == list(range(EVAL_PERIOD, ITERATIONS + 1, EVAL_PERIOD))
    path = f"gradient_statistics/lvis/iter_{ITERATIONS:07d}.csv"
    assert Path(client.download_artifacts(run.info.run_id, path)).read_text() == table
