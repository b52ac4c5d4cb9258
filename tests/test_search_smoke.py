"""The smallest real search, end to end: ``python tune/search.py --smoke`` on the offline benchmark.

Real components only: a local Ray cluster started by the command, Ray Train runs of the tiny
config (a few iterations, small images), a SQLite Optuna study, a SQLite MLflow store read back
with ``MlflowClient``.

The three trials are the search space's seed points, chosen so that each outcome is certain:

1. the paper's setting: trains and completes (two evaluations);
2. ``MODEL.ROI_HEADS.SCORE_THRESH_TEST 1.0``: the model keeps no detection, its first evaluation
   has no AP, which ranks last, so ASHA (grace period one evaluation) stops it there → PRUNED;
3. ``SOLVER.BASE_LR 1e5``: the loss becomes NaN at once, detectron2 raises → FAIL, and the search
   goes on.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from listening_sockets import descendants, is_loopback, listening_sockets

pytest.importorskip("ray")
optuna = pytest.importorskip("optuna")
mlflow = pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]

SPACE = """
params:
  alpha: {low: 0.0, high: 8.0}
  MODEL.ROI_HEADS.SCORE_THRESH_TEST: {choices: [0.0001, 1.0]}
  SOLVER.BASE_LR: {choices: [0.02, 100000.0]}
fixed: {gamma: 12.0, mu: 0.8}
seed_points:
  - {alpha: 4.0, MODEL.ROI_HEADS.SCORE_THRESH_TEST: 0.0001, SOLVER.BASE_LR: 0.02}
  - {alpha: 2.0, MODEL.ROI_HEADS.SCORE_THRESH_TEST: 1.0, SOLVER.BASE_LR: 0.02}
  - {alpha: 6.0, MODEL.ROI_HEADS.SCORE_THRESH_TEST: 0.0001, SOLVER.BASE_LR: 100000.0}
"""


class ListeningSockets(threading.Thread):
    """Samples, every second while ``pid`` lives, the listening TCP sockets of ``pid`` and its
    descendants (the search driver, Ray's GCS, raylet, dashboard, agents and workers)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.seen: set[tuple[str, int, str]] = set()

    def run(self) -> None:
        while Path(f"/proc/{self.pid}").exists():
            for _, command, ip, port in listening_sockets(descendants({self.pid})):
                self.seen.add((ip, port, Path(command.split(" ", 1)[0]).name))
            time.sleep(1.0)


def run_cli(
    args: list[str], cwd: Path, timeout: float, sockets: list | None = None
) -> subprocess.CompletedProcess:
    """``tune/search.py`` in a subprocess (its own session, so nothing it starts outlives it);
    with ``sockets``, the listening sockets its processes opened are appended to it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The offline benchmark where the project keeps it (generated once, shared by the tests).
    env.setdefault("EQLV2_SYNTHETIC_ROOT", str(ROOT / "datasets" / "eqlv2_synthetic"))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tune/search.py"), *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    sampler = ListeningSockets(proc.pid)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:  # on a timeout too: the search's session (its Ray cluster included) goes with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    if sockets is not None:
        sockets.extend(sorted(sampler.seen))
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Runs the smoke search once for the tests of this module."""
    work = tmp_path_factory.mktemp("smoke")
    (work / "space.yaml").write_text(SPACE)
    sockets: list = []
    proc = run_cli(
        ["--smoke", "--search-space", str(work / "space.yaml"), "--results-dir", str(work / "runs"), "--name", "smoke",
         "--noise-seeds", "1", "--concurrency", "1"],  # fmt: skip  # one at a time: ASHA stops trial 2 against trial 1
        cwd=work,
        timeout=1800,  # a hung search fails; a loaded 2-core machine may need 15+ min
        sockets=sockets,
    )
    (work / "stdout.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"work": work, "runs": work / "runs", "stdout": proc.stdout, "sockets": sockets}


@pytest.mark.slow
def test_ranked_table_and_best_config(smoke):
    out = smoke["stdout"]
    header = next(line for line in out.splitlines() if line.startswith("| rank"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:4] == ["rank", "trial", "status", "alpha"]
    assert {"gamma", "mu", "AP", "APr", "APc", "APf"} <= set(columns)
    rows = [line for line in out.splitlines() if re.match(r"^\| \d+ ", line)]
    statuses = [row.split("|")[3].strip() for row in rows]
    assert statuses == ["complete", "pruned", "failed"]  # best first, then stopped, then failed
    assert "Best configuration" in out and "alpha = 4.0000" in out
    uri = f"sqlite:///{smoke['runs'].resolve()}/mlflow.db"
    assert f"mlflow ui --backend-store-uri {uri}" in out
    assert (smoke["runs"] / "ray_results/smoke/ranked_trials.csv").is_file()


@pytest.mark.slow
def test_baseline_row_and_noise_band(smoke):
    out = smoke["stdout"]
    header = next(line for line in out.splitlines() if line.startswith("| rank"))
    assert header.rstrip(" |").endswith("vs paper point")
    references = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ref ")]
    assert [(r[1], r[2]) for r in references] == [("baseline sigmoid", "complete"), ("paper point, seed 43", "complete")]
    assert "Noise band of the paper point (2 seeds): AP = " in out
    assert re.search(r"Best trial \S+ against the baseline sigmoid: AP [+-]\d", out)
    assert "Parameter importance not computed: 1 completed trial(s)" in out
    table = pd.read_csv(smoke["runs"] / "ray_results/smoke/ranked_trials.csv")
    assert list(table["rank"].astype(str)) == ["1", "2", "3", "ref", "ref"]
    assert list(table["trial"])[-2:] == ["baseline sigmoid", "paper point, seed 43"]
    assert "vs paper point" in table.columns


@pytest.mark.slow
def test_search_listens_on_loopback_only(smoke):
    """Every TCP socket the search's processes listened on (sampled each second) is loopback:
    Ray's servers, the trials' Ray Train workers, their gloo listeners and the TCPStore of each
    training run (bound by :mod:`eqlv2.raytrain.process_group`)."""
    names = {name for _, _, name in smoke["sockets"]}
    assert {"gcs_server", "raylet"} <= names, smoke["sockets"]
    assert any(name.startswith("ray::RayTrainWorker") for name in names), smoke["sockets"]
    assert [s for s in smoke["sockets"] if not is_loopback(s[0])] == []


@pytest.mark.slow
def test_optuna_study_holds_complete_pruned_and_failed(smoke):
    url = f"sqlite:///{smoke['runs'].resolve()}/optuna.db"
    (summary,) = optuna.get_all_study_summaries(storage=url)
    study = optuna.load_study(study_name=summary.study_name, storage=url)
    states = {round(t.params["alpha"], 1): t for t in study.trials}
    assert set(states) == {4.0, 2.0, 6.0}
    assert states[4.0].state == optuna.trial.TrialState.COMPLETE
    assert sorted(states[4.0].intermediate_values) == [1, 2]
    assert states[4.0].value == pytest.approx(states[4.0].intermediate_values[2])
    assert states[2.0].state == optuna.trial.TrialState.PRUNED
    assert states[6.0].state == optuna.trial.TrialState.FAIL
    assert all(t.user_attrs.get("experiment") == "smoke" for t in study.trials)


@pytest.mark.slow
def test_mlflow_runs_read_back(smoke):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{smoke['runs'].resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("eqlv2-search")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "search"]
    all_children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    children = [r for r in all_children if r.data.tags["trial_role"] == "search"]
    references = {r.data.tags["trial_role"]: r for r in all_children if r.data.tags["trial_role"] != "search"}
    assert set(references) == {"baseline", "noise"} and len(all_children) == 5
    assert all((r.info.status, r.data.tags["trial_status"]) == ("FINISHED", "completed") for r in references.values())
    assert references["baseline"].data.params["overrides"].endswith("MODEL.EQLV2.LOSS sigmoid")
    assert "alpha" not in references["baseline"].data.params and references["noise"].data.params["seed"] == "43"
    assert parent.data.metrics["noise/runs"] == 2 and "noise/objective_std" in parent.data.metrics
    assert parent.data.metrics["baseline/lvis/AP"] == pytest.approx(references["baseline"].data.metrics["lvis/AP"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space/alpha"] == "uniform[0, 8]"
    assert parent.data.params["space/gamma"] == "fixed 12.0"
    assert parent.data.metrics["trials_complete"] == 1 and parent.data.metrics["trials_pruned"] == 1
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ranked_trials.csv", "best_config.json", "summary.txt", "optuna"} <= parent_files
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "optuna")] == ["optuna/optuna_history.png"]

    by_alpha = {round(float(r.data.params["alpha"]), 1): r for r in children}
    assert set(by_alpha) == {4.0, 2.0, 6.0}
    assert all(r.info.status != "RUNNING" for r in children)
    done, stopped, failed = by_alpha[4.0], by_alpha[2.0], by_alpha[6.0]
    assert (done.info.status, done.data.tags["trial_status"]) == ("FINISHED", "completed")
    assert (stopped.info.status, stopped.data.tags["trial_status"]) == ("KILLED", "stopped_early")
    assert (failed.info.status, failed.data.tags["trial_status"]) == ("FAILED", "failed")
    assert re.search(r"FloatingPointError|NaN|infinite", failed.data.tags["error"])
    assert done.data.tags["tune_trial_id"] and done.data.tags["mlflow.parentRunId"] == parent.info.run_id

    params = done.data.params
    assert params["gamma"] == "12.0" and params["mu"] == "0.8" and params["alpha"] == "4.0"
    assert params["datasets"] == "lvis" and params["seed"] == "42"
    assert params["config/lvis"].endswith("mask_rcnn_tiny_synthetic_lvis.yaml")
    losses = client.get_metric_history(done.info.run_id, "lvis/total_loss")
    assert len({m.step for m in losses}) >= 2
    ap = client.get_metric_history(done.info.run_id, "lvis/AP")
    assert sorted(m.step for m in ap) == [6, 12]
    for name in ("lvis/lr", "lvis/APr", "lvis/grad/ratio_mean_r", "lvis/grad/ratio_mean_f", "objective"):
        assert name in done.data.metrics, name

    grads = {a.path for a in client.list_artifacts(done.info.run_id, "gradient_statistics/lvis")}
    assert {
        "gradient_statistics/lvis/iter_0000006.csv",
        "gradient_statistics/lvis/iter_0000012.csv",
        "gradient_statistics/lvis/ratio_iter_0000012.png",
    } <= grads
    table = Path(client.download_artifacts(done.info.run_id, "gradient_statistics/lvis/iter_0000012.csv", str(smoke["work"])))
    header, *rows = table.read_text().splitlines()
    assert header == "category,name,group,train_count,pos_grad,neg_grad,ratio,q,r"
    assert len(rows) == 60 and {row.split(",")[2] for row in rows} == {"r", "c", "f"}
    norms = {a.path for a in client.list_artifacts(done.info.run_id, "weight_norms")}
    assert norms == {"weight_norms/lvis.csv", "weight_norms/lvis.png"}
