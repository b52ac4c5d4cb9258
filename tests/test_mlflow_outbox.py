"""The MLflow outbox against a real ``mlflow server`` that is stopped and restarted mid-way:
every run, param, metric point (value, step, timestamp) and artifact arrives exactly once, in
order, and an interrupted replay (killed, or raising) doubles nothing when resumed."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from mlflow_server import MlflowServer, free_port  # isort: skip (before mlflow: switches its telemetry off)
from matplotlib.figure import Figure
from mlflow import MlflowClient

from eqlv2.search.mlflow_outbox import (
    OUTBOX_RUN_TAG,
    DurableMlflow,
    Outbox,
    outbox_folders,
    pending_count,
    replay,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_767_000_000_000  # metric timestamps (ms) chosen by the test, so the history can be compared


@pytest.fixture(scope="module")
def fast_failing_http():
    """MLflow's HTTP client fails at once on a dead server instead of retrying for minutes."""
    saved = {
        key: os.environ.get(key)
        for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _log_trial(
    mlflow: DurableMlflow, run: str, steps: range, source: Path, *, terminate: bool
) -> None:
    """What a trial logs: metrics AP and loss at ``steps``, then a tag, an artifact and a text."""
    for step in steps:
        mlflow.log_metrics(run, {"lvis/AP": 10.0 + step, "lvis/loss": 1.0 / (step + 1), "skip": float("nan")},
                           step=step, timestamp_ms=T0 + 1000 * step)  # fmt: skip
    if terminate:
        mlflow.set_tags(run, {"trial_status": "completed"})
        source.write_text(f"table of {source.stem}\n")
        mlflow.log_artifact(run, source, "gradient_statistics/lvis")
        source.unlink()  # the outbox keeps its own copy
        mlflow.log_text(run, f"command of {source.stem}", "command.txt")
        mlflow.terminate(run, "FINISHED")


@pytest.fixture(scope="module")
def outage(tmp_path_factory, fast_failing_http):
    """A server that is up, then down while two trials and an offline writer log, then up again."""
    tmp = tmp_path_factory.mktemp("outbox")
    server = MlflowServer(tmp / "server")
    server.start()
    try:
        experiment = MlflowClient(server.uri).create_experiment("outbox")
        live = DurableMlflow(server.uri, tmp / "live", retry_after=0)
        run_a = live.create_run(experiment, "trial-a", tags={"tune_trial_id": "a"})
        live.log_params(run_a, {"gamma": 12.0, "mu": 0.8})
        _log_trial(live, run_a, range(0, 3), tmp / "a.csv", terminate=False)
        assert live.pending() == 0
        server.stop()

        _log_trial(live, run_a, range(3, 6), tmp / "a.csv", terminate=True)
        run_b = live.create_run(experiment, "trial-b", tags={"tune_trial_id": "b"})
        live.log_params(run_b, {"gamma": 4.5, "mu": 0.6})
        in_ray = pickle.loads(pickle.dumps(live))  # what a Ray trial process gets
        _log_trial(in_ray, run_b, range(0, 4), tmp / "b.csv", terminate=True)

        offline = DurableMlflow(server.uri, tmp / "offline", retry_after=0)
        run_c = offline.create_run(experiment, "trial-c")
        offline.log_params(run_c, {"alpha": 4.0})
        _log_trial(offline, run_c, range(0, 5), tmp / "c.csv", terminate=True)
        server.start()
        yield {
            "server": server,
            "tmp": tmp,
            "experiment": experiment,
            "live": live,
            "runs": (run_a, run_b, run_c),
        }
    finally:
        server.stop()


def _one_run(client: MlflowClient, experiment: str, name: str):
    runs = client.search_runs([experiment], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"{len(runs)} runs named {name}"
    return runs[0]


def _check_trial(client: MlflowClient, run, steps: range, name: str, tmp: Path) -> None:
    """Everything :func:`_log_trial` logged is there exactly once."""
    assert run.info.status == "FINISHED" and run.data.tags["trial_status"] == "completed"
    for key, value in (("lvis/AP", lambda s: 10.0 + s), ("lvis/loss", lambda s: 1.0 / (s + 1))):
        history = sorted(
            (m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, key)
        )
        assert history == [(s, T0 + 1000 * s, value(s)) for s in steps]
    assert "skip" not in run.data.metrics
    folder = tmp / "download" / name
    client.download_artifacts(run.info.run_id, "", str(folder))
    assert (folder / "gradient_statistics/lvis" / f"{name}.csv").read_text() == f"table of {name}\n"
    assert (folder / "command.txt").read_text() == f"command of {name}"


def test_backlog_replayed_in_order_before_the_next_call(outage):
    live, tmp, experiment = outage["live"], outage["tmp"], outage["experiment"]
    run_a, run_b, _ = outage["runs"]
    assert run_b.startswith("outbox-") and not run_a.startswith("outbox-")
    # a: 3 metric batches, tag, 2 artifacts, end; b: create, params, 4 metric batches + 4
    assert pending_count(tmp / "live") == 7 + 10

    run_d = live.create_run(experiment, "trial-d")  # the server is back: backlog first, then this
    assert not run_d.startswith("outbox-")
    live.terminate(run_d, "FINISHED")
    assert pending_count(tmp / "live") == 0
    assert not list((tmp / "live" / "blobs").glob("*/*")), "artifact copies are removed once sent"

    client = MlflowClient(outage["server"].uri)
    a, b = _one_run(client, experiment, "trial-a"), _one_run(client, experiment, "trial-b")
    assert a.info.run_id == run_a
    assert (
        b.info.run_id == Outbox(tmp / "live").resolve(run_b)
        and b.data.tags[OUTBOX_RUN_TAG] == run_b
    )
    assert a.data.params == {"gamma": "12.0", "mu": "0.8"}
    assert b.data.params == {"gamma": "4.5", "mu": "0.6"}
    _check_trial(
        client, a, range(0, 6), "a", tmp
    )  # metrics sent after the end of the run would be refused
    _check_trial(client, b, range(0, 4), "b", tmp)
    assert _one_run(client, experiment, "trial-d").info.status == "FINISHED"
    running = client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")
    assert running == []


_KILL_AT_FIRST_ENTRY = textwrap.dedent(
    """
    import os, signal, sys
    from eqlv2.search.mlflow_outbox import replay

    def die(entry):  # the server holds the entry, the outbox does not know yet
        os.kill(os.getpid(), signal.SIGKILL)

    replay(sys.argv[1], progress=die)
    """
)


def test_interrupted_replay_doubles_nothing(outage):
    tmp, experiment = outage["tmp"], outage["experiment"]
    folder = tmp / "offline"
    total = pending_count(folder)
    assert total == 1 + 1 + 5 + 4  # create, params, 5 metric batches, tag, artifact, text, end

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AT_FIRST_ENTRY, str(folder)], env=env, timeout=300
    )
    assert killed.returncode == -9
    assert pending_count(folder) == total  # create_run reached the server but is still to confirm

    seen = []

    def fail_at_third(entry):
        seen.append(entry.op)
        if len(seen) == 3:
            raise RuntimeError("power cut")

    report = replay(folder, progress=fail_at_third)
    assert seen == ["create_run", "log_batch", "log_batch"]
    assert report.error == "RuntimeError: power cut" and report.pending == total - 2
    assert report.replayed == {"create_run": 1, "log_batch": 1}

    report = replay(folder)
    assert report.complete and report.pending == 0, report.summary()
    assert sum(report.replayed.values()) == total - 2
    client = MlflowClient(outage["server"].uri)
    run = _one_run(client, experiment, "trial-c")
    assert run.data.tags[OUTBOX_RUN_TAG] == outage["runs"][2] == next(iter(report.runs))
    assert run.data.params == {"alpha": "4.0"}
    _check_trial(client, run, range(0, 5), "c", tmp)


# --- without a server -----------------------------------------------------------------------------


def test_dead_server_journals_and_pickled_copy_shares_the_outbox(tmp_path, fast_failing_http):
    uri = f"http://127.0.0.1:{free_port()}"
    mlflow = DurableMlflow(uri, tmp_path / "outbox", retry_after=3600)
    run = mlflow.create_run("1", "offline")
    assert run.startswith("outbox-")
    copy = pickle.loads(pickle.dumps(mlflow))
    copy.log_metrics(run, {"AP": 1.0}, step=1)
    mlflow.log_metrics(run, {"AP": float("inf")}, step=2)  # not finite: nothing to log
    copy.terminate(run, "FAILED")
    figure = Figure()
    figure.subplots().plot([0, 1], [1, 0])
    copy.log_figure(run, figure, "plots/ratio.png")
    (kept,) = (tmp_path / "outbox" / "blobs").glob("*/ratio.png")
    assert kept.read_bytes().startswith(b"\x89PNG")
    assert pending_count(tmp_path / "outbox") == 4 == mlflow.pending()
    outbox = Outbox(tmp_path / "outbox")
    # the first call was tried: the server may have taken it, so its replay checks before resending
    assert outbox.next_entry().state == "sent" and outbox.count("pending") == 3
    assert pending_count(tmp_path / "nothing") == 0
    report = mlflow.flush()
    assert report.pending == 4 and report.replayed == {} and "MlflowException" in report.error


def test_outbox_belongs_to_one_tracking_uri(tmp_path):
    Outbox(tmp_path, "http://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"belongs to http://127.0.0.1:1, not http://127.0.0.1:2"):
        Outbox(tmp_path, "http://127.0.0.1:2")


def test_an_outbox_of_the_earlier_sqlite_format_is_named_not_ignored(tmp_path, caplog):
    legacy = tmp_path / "node-a"
    legacy.mkdir()
    (legacy / "outbox.sqlite").write_bytes(b"SQLite format 3\x00")
    with caplog.at_level("WARNING", logger="eqlv2.search.mlflow_outbox"):
        assert outbox_folders(tmp_path) == []
        Outbox(legacy, "http://127.0.0.1:1")
    named = [r.getMessage() for r in caplog.records if str(legacy / "outbox.sqlite") in r.getMessage()]
    assert len(named) == 2 and "git checkout 3fb4294" in named[0]
    assert (legacy / "outbox.sqlite").exists()


def test_resent_batch_skips_points_the_store_already_holds(tmp_path, monkeypatch):
    """An entry interrupted after the store took it is checked before it is sent again: MLflow's
    SQL store drops exact duplicates itself, its file store (used here) does not."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("resend")).info.run_id
    mlflow = DurableMlflow(uri, tmp_path / "outbox")
    mlflow.log_metrics(run_id, {"AP": 1.0}, step=1, timestamp_ms=T0)  # written through
    mlflow.log_params(run_id, {"gamma": 12.0})
    outbox = Outbox(tmp_path / "outbox")
    for payload in (
        {"metrics": [["AP", 1.0, T0, 1], ["AP", 2.0, T0 + 1, 2]]},
        {"params": [["gamma", "12.0"]]},
    ):
        outbox.append("log_batch", run_id, payload, state="sent")  # as left by a crash mid-replay
    report = replay(tmp_path / "outbox")
    assert report.complete and report.replayed == {"log_batch": 2}
    history = sorted(
        (m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, "AP")
    )
    assert history == [(1, T0, 1.0), (2, T0 + 1, 2.0)]
    assert client.get_run(run_id).data.params == {"gamma": "12.0"}


_APPENDER = """
import sys, time
from pathlib import Path
from eqlv2.search.mlflow_outbox import Outbox
outbox, name = Outbox(sys.argv[1]), sys.argv[2]
while not (Path(sys.argv[1]) / "go").exists():  # all four start appending at once
    time.sleep(0.01)
for index in range(40):
    outbox.append("log_text", None, {"text": f"{name}-{index}", "artifact_file": "t.txt"})
    outbox.pending()  # a read between appends, as every call of a trial makes
print(outbox.pending())  # what this process has folded: all 160 for the last to append
"""


def test_journal_of_processes_appending_and_reading_at_once(tmp_path):
    """Four processes append 40 calls each while reading the journal between appends (shared
    lock for reads, exclusive for appends): the last to append has folded all 160 (none skipped
    by a read racing an append), so has a fresh reader, every process's calls are in the order
    it made them, none twice, and the journal has no partial line."""
    Outbox(tmp_path, "http://127.0.0.1:1")
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(tmp_path), f"p{n}"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for n in range(4)
    ]  # fmt: skip
    (tmp_path / "go").touch()
    folded = [int(proc.communicate(timeout=120)[0]) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0] and max(folded) == 160, folded
    assert Outbox(tmp_path).pending() == 160
    lines = (tmp_path / "outbox.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 1 + 160 + 1  # the binding, the calls, the end
    texts = [json.loads(line)["payload"]["text"] for line in lines[1:-1]]
    assert len(set(texts)) == 160
    for n in range(4):
        assert [t for t in texts if t.startswith(f"p{n}-")] == [f"p{n}-{i}" for i in range(40)]


def test_journal_reads_share_the_lock_and_appends_wait_for_it(tmp_path):
    """With the journal's lock held shared (a reader folding it), another read goes ahead and an
    append waits until it is released; held exclusively (an append), a read waits too."""
    outbox = Outbox(tmp_path, "http://127.0.0.1:1")

    def in_thread(call) -> threading.Thread:
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        return thread

    with open(tmp_path / "outbox.jsonl", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_SH)
        read = in_thread(lambda: Outbox(tmp_path).pending())
        read.join(timeout=20)
        assert not read.is_alive(), "a read waited for another reader"
        append = in_thread(lambda: outbox.append("log_text", None, {"text": "x", "artifact_file": "t"}))
        append.join(timeout=1.0)
        assert append.is_alive(), "an append went ahead while a reader held the lock"
        fcntl.flock(held, fcntl.LOCK_UN)
        append.join(timeout=20)
        assert not append.is_alive()
        fcntl.flock(held, fcntl.LOCK_EX)
        read = in_thread(lambda: Outbox(tmp_path).pending())
        read.join(timeout=1.0)
        assert read.is_alive(), "a read went ahead during an append"
    read.join(timeout=20)  # closing the file released the lock
    assert not read.is_alive() and Outbox(tmp_path).pending() == 1
