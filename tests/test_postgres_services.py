"""The head node's servers (configs/cluster/head_services.sh): a real PostgreSQL holding an Optuna
study, a real MLflow tracking server storing runs in it and artifacts in a folder, both on
loopback only and behind the database password."""

from __future__ import annotations

import gc
import os
import subprocess

import pytest
from pg_fixtures import HEAD_SERVICES, mlflow_server, postgres  # noqa: F401

optuna = pytest.importorskip("optuna")
psycopg = pytest.importorskip("psycopg")


def _connect(postgres, database: str, password: str | None):  # noqa: F811
    return psycopg.connect(
        host="127.0.0.1", port=postgres.port, user=postgres.user, dbname=database, password=password, connect_timeout=10
    )


def test_postgres_listens_on_loopback_and_wants_the_password(postgres):  # noqa: F811
    with _connect(postgres, "optuna", postgres.env["PGPASSWORD"]) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SELECT current_user").fetchone() == ("eqlv2",)
    environment = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "environ", environment)
        with pytest.raises(psycopg.OperationalError, match="password"):
            _connect(postgres, "optuna", None)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            _connect(postgres, "optuna", "wrong")


def test_optuna_study_round_trip(postgres, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PGPASSWORD", postgres.env["PGPASSWORD"])
    url = postgres.url("optuna")
    study = optuna.create_study(study_name="round-trip", storage=url, direction="maximize")
    for value in (0.25, 0.5):
        trial = study.ask()
        trial.suggest_float("alpha", 0.0, 8.0)
        study.tell(trial, value)
    loaded = optuna.load_study(study_name="round-trip", storage=url)
    assert [t.value for t in loaded.trials] == [0.25, 0.5]
    assert loaded.best_value == 0.5
    optuna.delete_study(study_name="round-trip", storage=url)


def test_mlflow_server_keeps_runs_in_postgres_and_artifacts_in_its_folder(mlflow_server, postgres, tmp_path):  # noqa: F811
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("services-round-trip")
    run = client.create_run(experiment)
    for step, value in enumerate((1.0, 0.5, 0.25)):
        client.log_metric(run.info.run_id, "loss", value, step=step)
    (tmp_path / "note.txt").write_text("kept by the server")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)

    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    stored = list((postgres.folder / "mlflow-artifacts").rglob("note.txt"))
    assert [p.read_text() for p in stored] == ["kept by the server"]
    with _connect(postgres, "mlflow", postgres.env["PGPASSWORD"]) as conn:
        rows = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,)).fetchall()
    assert rows == [("FINISHED",)]


def test_head_services_refuses_every_interface(postgres):  # noqa: F811
    proc = subprocess.run(
        ["bash", str(HEAD_SERVICES), "start"], env={**postgres.env, "EQLV2_BIND": "0.0.0.0"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "EQLV2_BIND=0.0.0.0 would listen on every interface" in proc.stderr


def test_trial_reads_of_the_study_keep_no_connection(postgres, monkeypatch):  # noqa: F811
    """A trial process reads its own record of the study (``read_finished_trial``) and keeps no
    connection open: storages opened the default way (pooled) once held theirs until the garbage
    collector found them, and enough of them exhausted ``max_connections`` (StorageInternalError)."""
    from eqlv2.search.optuna_study import RESULT_ATTR, read_finished_trial

    monkeypatch.setenv("PGPASSWORD", postgres.env["PGPASSWORD"])
    url = postgres.url("optuna")
    study = optuna.create_study(study_name="trial-reads", storage=url, direction="maximize")
    done, running = study.ask(), study.ask()
    done.set_user_attr(RESULT_ATTR, {"objective": 2.0})
    study.tell(done, 2.0)

    def connections() -> int:
        with _connect(postgres, "optuna", postgres.env["PGPASSWORD"]) as conn:
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = 'optuna' AND pid <> pg_backend_pid()"
            return conn.execute(query).fetchone()[0]

    before = connections()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as lazy a collector as a long test session's: nothing may rely on it
    try:
        reads = [read_finished_trial(url, "trial-reads", n) for n in (done.number, running.number, 99) for _ in range(5)]
        after = connections()
    finally:
        if gc_was_enabled:
            gc.enable()
    assert reads[0] == {"state": "COMPLETE", "metrics": {"objective": 2.0}, "values": [2.0]}
    assert reads[5] is None and reads[10] is None  # running, and no such trial
    assert read_finished_trial(url, "no-such-study", 0) is None
    assert after <= before, f"{after - before} connection(s) left open by 15 reads"
    optuna.delete_study(study_name="trial-reads", storage=url)
