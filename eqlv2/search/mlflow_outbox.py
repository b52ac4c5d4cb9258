"""A durable outbox for MLflow: calls made while the tracking server is unreachable are kept on
local disk, in order, and replayed exactly once when it is back.

One outbox per node (:func:`node_outbox`, ``<results dir>/mlflow_outbox/<hostname>``, on a local
disk: SQLite locking is not safe on NFS). The driver, its trials and their rank-0 workers append
to the same journal, so their calls are replayed in the order they were made, whichever process
replays. A folder belongs to one tracking URI and holds no credentials.

Exactly once: an entry is marked *sent* before its call goes out and *done* (with the
placeholder's real run id, in one transaction) after it returns. A *sent* entry may already be
on the server, so its replay checks first: a run is created with the tag :data:`OUTBOX_RUN_TAG`
= its placeholder and an existing run with it is reused; metric points and params the run holds
are dropped; tags, artifacts, texts and states overwrite with the same value.

``create_run`` while the server is down returns a placeholder (``outbox-<hex>``) that every
method accepts and that the outbox maps to the real id. An unreachable server (connection
errors, timeouts, 5xx) leaves an entry pending; a call the server rejects (MLflow's 4xx codes, a
missing file) is marked *failed* and reported, so it cannot block the calls after it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from .mlflow_client import finite_metrics, first_line, limit_http_retries, search_tagged_runs

logger = logging.getLogger(__name__)

#: Tag of a run created through the outbox: its placeholder id (makes re-creation idempotent).
OUTBOX_RUN_TAG = "eqlv2.outbox_run"
PLACEHOLDER_PREFIX = "outbox-"
#: MLflow error codes meaning "the server answered and refuses this call": not retried.
REJECTION_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
     "BAD_REQUEST", "MALFORMED_REQUEST", "RESOURCE_LIMIT_EXCEEDED", "REQUEST_LIMIT_EXCEEDED"}
)  # fmt: skip
OPEN_STATUSES = ("RUNNING", "SCHEDULED")
PENDING, SENT, DONE, FAILED = "pending", "sent", "done", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, run_ref TEXT, payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', error TEXT, created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_state ON entries (state, seq);
CREATE TABLE IF NOT EXISTS runs (
    placeholder TEXT PRIMARY KEY, run_id TEXT, tags TEXT NOT NULL DEFAULT '{}', closed INTEGER NOT NULL DEFAULT 0
);
"""


def is_placeholder(run_ref: str | None) -> bool:
    return bool(run_ref) and str(run_ref).startswith(PLACEHOLDER_PREFIX)


def node_outbox(root: str | os.PathLike) -> Path:
    """This node's outbox folder under ``root`` (``<root>/<hostname>``)."""
    return Path(root).expanduser().resolve() / socket.gethostname()


def outbox_folders(root: str | os.PathLike) -> list[Path]:
    """The outbox folders under ``root`` (one per node that wrote there), sorted."""
    return sorted(path.parent for path in Path(root).glob("*/outbox.sqlite"))


@dataclass(frozen=True)
class JournalEntry:
    """One journaled call: ``op`` is ``create_run``, ``log_batch``, ``log_artifact``,
    ``log_text``, ``update_run`` or ``set_terminated``; ``payload`` its JSON-able arguments."""

    seq: int
    op: str
    run_ref: str | None
    payload: dict[str, Any]
    state: str


@dataclass(frozen=True)
class TrackedRun:
    """A run found by :meth:`DurableMlflow.find_runs`: id or placeholder, open as far as this
    node knows, tags."""

    ref: str
    open: bool
    tags: dict[str, str]


class Outbox:
    """The journal in ``folder``, bound to ``tracking_uri`` (None: the one it holds).

    Raises:
        ValueError: the outbox belongs to another tracking URI, or a new outbox has no URI.
    """

    def __init__(self, folder: str | os.PathLike, tracking_uri: str | None = None) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.folder / "outbox.sqlite", timeout=60.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.tracking_uri = self._bind(tracking_uri)

    def _bind(self, tracking_uri: str | None) -> str:
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'tracking_uri'").fetchone()
            if row is None:
                if tracking_uri is None:
                    raise ValueError(f"{self.folder} holds no MLflow outbox: give its tracking URI")
                db.execute("INSERT INTO meta VALUES ('tracking_uri', ?)", (tracking_uri,))
                return tracking_uri
        if tracking_uri is not None and row[0] != tracking_uri:
            raise ValueError(
                f"the MLflow outbox {self.folder} belongs to {row[0]}, not {tracking_uri}: replay it "
                "there first, or give another outbox folder"
            )
        return row[0]

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def append(self, op: str, run_ref: str | None, payload: Mapping[str, Any], state: str = PENDING, error: str | None = None) -> int:
        """Journals one call durably; returns its sequence number."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO entries (op, run_ref, payload, state, error, created) VALUES (?, ?, ?, ?, ?, ?)",
                (op, run_ref, json.dumps(payload), state, error, time.time()),
            )
            return int(cursor.lastrowid)

    def new_placeholder(self, tags: Mapping[str, str] | None = None) -> str:
        """A fresh placeholder run id, registered unmapped with the run's ``tags``."""
        placeholder = f"{PLACEHOLDER_PREFIX}{uuid.uuid4().hex}"
        with self._transaction() as db:
            db.execute("INSERT INTO runs (placeholder, tags) VALUES (?, ?)", (placeholder, json.dumps(dict(tags or {}))))
        return placeholder

    def keep_file(self, source: str | os.PathLike) -> str:
        """Copies ``source`` into ``blobs/`` (fsynced) and returns the copy's path."""
        source = Path(source)
        folder = self.folder / "blobs" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        target, partial = folder / source.name, folder / f".{source.name}.partial"
        shutil.copyfile(source, partial)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, target)
        return str(target)

    def mark(
        self, seq: int | None, state: str = DONE, error: str | None = None, run_id: str | None = None, placeholder: str | None = None
    ) -> None:
        """Sets entry ``seq``'s state (None: no entry) and maps ``placeholder`` to ``run_id``, in
        one transaction."""
        with self._transaction() as db:
            if seq is not None:
                db.execute("UPDATE entries SET state = ?, error = ? WHERE seq = ?", (state, error, seq))
            if placeholder and run_id:
                db.execute(
                    "INSERT INTO runs (placeholder, run_id) VALUES (?, ?) "
                    "ON CONFLICT (placeholder) DO UPDATE SET run_id = excluded.run_id",
                    (placeholder, run_id),
                )

    def set_closed(self, run_ref: str, closed: bool, tags: Mapping[str, str] | None = None) -> None:
        """Records that ``run_ref`` was closed (or reopened) through this outbox; a run the
        registry does not hold yet is added with ``tags``."""
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE runs SET closed = ? WHERE placeholder = ? OR run_id = ?", (int(closed), run_ref, run_ref)
            ).rowcount
            if not changed and tags is not None:
                db.execute("INSERT INTO runs VALUES (?, ?, ?, ?)", (run_ref, run_ref, json.dumps(dict(tags)), int(closed)))

    def resolve(self, run_ref: str | None) -> str | None:
        """The MLflow run id of ``run_ref`` (None: a placeholder whose run is not created yet)."""
        if not is_placeholder(run_ref):
            return run_ref
        row = self._db.execute("SELECT run_id FROM runs WHERE placeholder = ?", (run_ref,)).fetchone()
        return row[0] if row else None

    def next_entry(self) -> JournalEntry | None:
        """The oldest entry still to send (pending or sent)."""
        row = self._db.execute(
            "SELECT seq, op, run_ref, payload, state FROM entries WHERE state IN (?, ?) ORDER BY seq LIMIT 1",
            (PENDING, SENT),
        ).fetchone()
        return None if row is None else JournalEntry(row[0], row[1], row[2], json.loads(row[3]), row[4])

    def count(self, *states: str) -> int:
        marks = ", ".join("?" * len(states))
        return int(self._db.execute(f"SELECT COUNT(*) FROM entries WHERE state IN ({marks})", states).fetchone()[0])

    def report(self, since: float = 0.0) -> ReplayReport:
        """What the outbox holds: entries done and rejected since ``since`` (epoch s), all pending."""
        rows = self._db.execute("SELECT op, COUNT(*) FROM entries WHERE state = ? AND created >= ? GROUP BY op", (DONE, since))
        failed = self._db.execute("SELECT seq, op, error FROM entries WHERE state = ? AND created >= ? ORDER BY seq", (FAILED, since))
        runs = self._db.execute("SELECT placeholder, run_id FROM runs").fetchall()
        return ReplayReport(
            replayed={op: int(n) for op, n in rows},
            failed=[(int(seq), op, error or "") for seq, op, error in failed],
            pending=self.count(PENDING, SENT),
            runs={ref: run_id for ref, run_id in runs if is_placeholder(ref)},
        )

    def tagged_runs(self, tags: Mapping[str, str]) -> list[tuple[str, str | None, dict[str, str], bool]]:
        """``(ref, run id or None, tags, closed)`` of the registered runs carrying every tag of ``tags``."""
        out = []
        for ref, run_id, text, closed in self._db.execute("SELECT placeholder, run_id, tags, closed FROM runs"):
            run_tags = json.loads(text)
            if all(run_tags.get(key) == value for key, value in tags.items()):
                out.append((ref, run_id, run_tags, bool(closed)))
        return out

    @contextmanager
    def replay_lock(self, blocking: bool) -> Iterator[bool]:
        """Holds the folder's replay lock (one replayer at a time); yields whether it got it."""
        with open(self.folder / "replay.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _opened(folder: str | os.PathLike, tracking_uri: str | None = None) -> Iterator[Outbox]:
    outbox = Outbox(folder, tracking_uri)
    try:
        yield outbox
    finally:
        outbox.close()


def pending_count(folder: str | os.PathLike) -> int:
    """Entries of the outbox in ``folder`` not yet on the server (0 if there is no outbox)."""
    if not (Path(folder) / "outbox.sqlite").exists():
        return 0
    with _opened(folder) as outbox:
        return outbox.count(PENDING, SENT)


# --- sending one entry ----------------------------------------------------------------------------


class _Rejected(Exception):
    """The server answered and refused the call (or the call cannot be made): not retried."""


def _is_rejection(error: BaseException) -> bool:
    if isinstance(error, MlflowException):
        return error.error_code in REJECTION_CODES
    return not isinstance(error, OSError)  # OSError covers connection errors and timeouts


def _log_batch(client: MlflowClient, run_id: str, payload: Mapping[str, Any], resent: bool) -> None:
    """``log_batch``; a resent one without the metric points and params the run already holds."""
    metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in payload.get("metrics", [])]
    params = [Param(k, v) for k, v in payload.get("params", [])]
    if resent:
        seen = set()
        for key in {m.key for m in metrics}:
            seen |= {(h.key, h.value, h.timestamp, h.step) for h in client.get_metric_history(run_id, key)}
        held = client.get_run(run_id).data.params if params else {}
        metrics = [m for m in metrics if (m.key, m.value, m.timestamp, m.step) not in seen]
        params = [p for p in params if held.get(p.key) != p.value]
    tags = [RunTag(k, v) for k, v in payload.get("tags", [])]
    if metrics or params or tags:
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)


def _create_run(client: MlflowClient, payload: dict[str, Any], placeholder: str | None, lookup: bool) -> str:
    """Creates the run tagged with its placeholder; with ``lookup``, reuses a run already tagged."""
    if placeholder and lookup and (found := search_tagged_runs(client, payload["experiment_id"], {OUTBOX_RUN_TAG: placeholder})):
        return found[0].info.run_id
    tags = dict(payload.get("tags") or {})
    if placeholder:
        tags[OUTBOX_RUN_TAG] = placeholder
    run = client.create_run(payload["experiment_id"], start_time=payload.get("start_time"), tags=tags, run_name=payload.get("run_name"))
    return run.info.run_id


def _send(
    client: MlflowClient, op: str, run_id: str | None, payload: dict[str, Any], *, placeholder: str | None = None, resent: bool = False
) -> str | None:
    """Makes one call; returns the new run id of ``create_run``. Raises :class:`_Rejected` when the
    server refused it or it cannot be made, anything else when the server is unreachable."""
    try:
        if op == "create_run":
            return _create_run(client, payload, placeholder, lookup=resent)
        if run_id is None:
            raise _Rejected("its run was never created (the create_run entry failed)")
        if op == "log_batch":
            _log_batch(client, run_id, payload, resent)
        elif op == "log_artifact":
            if not Path(payload["path"]).is_file():
                raise _Rejected(f"the file {payload['path']} is gone")
            client.log_artifact(run_id, payload["path"], payload.get("artifact_path"))
        elif op == "log_text":
            client.log_text(run_id, payload["text"], payload["artifact_file"])
        elif op == "update_run":
            client.update_run(run_id, status=payload["status"])
        elif op == "set_terminated":
            client.set_terminated(run_id, payload["status"], end_time=payload.get("end_time"))
        else:
            raise _Rejected(f"unknown operation {op!r}")
    except _Rejected:
        raise
    except Exception as error:
        if _is_rejection(error):
            raise _Rejected(f"{type(error).__name__}: {error}") from error
        raise
    return None


# --- replay ---------------------------------------------------------------------------------------


@dataclass
class ReplayReport:
    """What a replay did, or what an outbox holds: entries ``replayed`` by operation, the
    ``(seq, op, error)`` the server rejected, entries still ``pending``, placeholders mapped to
    run ids (``runs``), and why the replay stopped early (``error``)."""

    replayed: dict[str, int] = field(default_factory=dict)
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    pending: int = 0
    runs: dict[str, str | None] = field(default_factory=dict)
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.pending == 0 and not self.failed

    def add(self, other: ReplayReport) -> None:
        """Adds ``other`` (another outbox folder) to this report."""
        self.replayed = dict(Counter(self.replayed) + Counter(other.replayed))
        self.failed += other.failed
        self.pending += other.pending
        self.runs.update(other.runs)
        self.error = self.error or other.error

    def summary(self) -> str:
        sent = ", ".join(f"{n} {op}" for op, n in sorted(self.replayed.items())) or "nothing"
        line = f"MLflow outbox: replayed {sent}; {self.pending} call(s) pending; {len(self.failed)} rejected"
        return f"{line} (stopped: {self.error})" if self.error else line


Progress = Callable[[JournalEntry], None]


def _replay_entries(outbox: Outbox, client: MlflowClient, replayed: dict[str, int], progress: Progress | None) -> None:
    while (entry := outbox.next_entry()) is not None:
        placeholder = entry.run_ref if entry.op == "create_run" else None
        run_id = None if entry.op == "create_run" else outbox.resolve(entry.run_ref)
        if entry.state == PENDING:
            outbox.mark(entry.seq, SENT)
        try:
            new_run = _send(client, entry.op, run_id, entry.payload, placeholder=placeholder, resent=entry.state == SENT)
        except _Rejected as rejected:
            logger.warning("MLflow refused journaled call %d (%s): %s", entry.seq, entry.op, rejected)
            outbox.mark(entry.seq, FAILED, error=str(rejected)[:4000])
            continue
        if progress is not None:
            progress(entry)
        outbox.mark(entry.seq, DONE, run_id=new_run, placeholder=placeholder)
        replayed[entry.op] = replayed.get(entry.op, 0) + 1
        if entry.op == "log_artifact":
            shutil.rmtree(Path(entry.payload["path"]).parent, ignore_errors=True)


def replay_outbox(outbox: Outbox, client: MlflowClient, *, blocking: bool = True, progress: Progress | None = None) -> ReplayReport:
    """Sends ``outbox``'s pending entries in order with ``client`` (see :func:`replay`)."""
    replayed: dict[str, int] = {}
    error = None
    with outbox.replay_lock(blocking) as locked:
        if not locked:
            error = "another process is replaying this outbox"
        else:
            try:
                _replay_entries(outbox, client, replayed, progress)
            except Exception as failure:  # the server went away again: the rest stays pending
                error = f"{type(failure).__name__}: {first_line(failure)}"
    report = outbox.report()
    report.replayed, report.error = replayed, error
    return report


def replay(folder: str | os.PathLike, tracking_uri: str | None = None, *, progress: Progress | None = None) -> ReplayReport:
    """Replays the outbox in ``folder`` to its tracking server, in order, exactly once.

    Safe at any time from any process of the node (one replays at a time; others wait).
    ``progress`` is called with each entry after the server accepted it and before it is marked
    done; an exception raised there stops the replay like a crash.
    """
    with _opened(folder, tracking_uri) as outbox:
        return replay_outbox(outbox, MlflowClient(tracking_uri=outbox.tracking_uri), progress=progress)


def replay_all(root: str | os.PathLike, progress: Progress | None = None) -> ReplayReport:
    """Replays every outbox under ``root`` (``tune/search.py --sync``)."""
    report = ReplayReport()
    for folder in outbox_folders(root):
        report.add(replay(folder, progress=progress))
    return report


def outbox_report(root: str | os.PathLike, since: float = 0.0) -> ReplayReport:
    """What the outboxes under ``root`` hold (:meth:`Outbox.report`)."""
    report = ReplayReport()
    for folder in outbox_folders(root):
        with _opened(folder) as outbox:
            report.add(outbox.report(since))
    return report


# --- the client the search uses -------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _texts(values: Mapping[str, Any] | None, limit: int | None = None) -> dict[str, str]:
    return {str(k): str(v)[:limit] for k, v in (values or {}).items()}


class DurableMlflow:
    """A never-raising MLflow client that journals what it cannot send (see the module docstring).

    Each call: if the server was unreachable less than ``retry_after`` seconds ago, it is
    journaled at once (no waiting on a dead server); otherwise the backlog is replayed first and,
    once nothing is pending, the call is sent, and journaled if the server is unreachable.
    Picklable: the copy re-opens the outbox in its process. ``outbox_dir`` must be on a local disk
    of this node (:func:`node_outbox`).
    """

    def __init__(self, tracking_uri: str, outbox_dir: str | os.PathLike, retry_after: float = 30.0) -> None:
        self.tracking_uri = tracking_uri
        self.outbox_dir = str(Path(outbox_dir).expanduser().resolve())
        self.retry_after = retry_after
        self._reset()

    @classmethod
    def on_node(cls, tracking_uri: str, outbox_root: str | os.PathLike, short_retries: bool = False) -> DurableMlflow:
        """The client of this node's outbox under the search's ``outbox_root``; with
        ``short_retries`` (trial and rank-0 worker processes) a dead server does not stall it."""
        if short_retries:
            limit_http_retries()
        return cls(tracking_uri, node_outbox(outbox_root))

    def _reset(self) -> None:
        self._outbox: Outbox | None = None
        self._client: MlflowClient | None = None
        self._pid = os.getpid()
        self._down_since: float | None = None
        self._lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        return {key: self.__dict__[key] for key in ("tracking_uri", "outbox_dir", "retry_after")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def outbox(self) -> Outbox:
        """This process's handle on the outbox (re-opened after a fork or unpickling)."""
        if self._outbox is None or self._pid != os.getpid():
            self._outbox = Outbox(self.outbox_dir, self.tracking_uri)
            self._pid = os.getpid()
        return self._outbox

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def available(self) -> bool:
        """False while calls are journaled without trying, after the server was unreachable."""
        return self._down_since is None or time.monotonic() - self._down_since >= self.retry_after

    def pending(self) -> int:
        """Entries of the outbox not yet on the server (of every process using it); -1 if unreadable."""
        return self._guard("count the outbox", lambda: self.outbox.count(PENDING, SENT), default=-1)

    def _guard(self, what: str, fn: Callable[[], Any], default: Any = None) -> Any:
        """``fn()``, or ``default`` and an error log if the outbox itself fails (full disk...)."""
        try:
            return fn()
        except Exception:
            logger.exception("MLflow outbox %s: could not %s", self.outbox_dir, what)
            return default

    def _went_down(self, what: str, error: BaseException | str) -> None:
        if self._down_since is None:
            logger.warning(
                "MLflow at %s unreachable (%s); calls are kept in %s and sent when it is back (from: %s)",
                self.tracking_uri, first_line(error), self.outbox_dir, what,
            )  # fmt: skip
        self._down_since = time.monotonic()

    def flush(self) -> ReplayReport:
        """Replays the backlog now, waiting for another process's replay; never raises."""
        with self._lock:
            report = self._guard("replay", lambda: replay_outbox(self.outbox, self.client, blocking=True))
            if report is None:
                return ReplayReport(error="the outbox could not be read", pending=-1)
            if report.error and report.pending:
                self._went_down("replay", report.error)
            elif not report.pending:
                self._down_since = None
            return report

    def _backlog_cleared(self) -> bool:
        if self.outbox.count(PENDING, SENT) == 0:
            return True
        report = replay_outbox(self.outbox, self.client, blocking=False)
        if report.replayed:
            logger.warning("MLflow at %s is back: %s", self.tracking_uri, report.summary())
        if report.pending and report.error and "another process" not in report.error:
            self._went_down("replay", report.error)
        return report.pending == 0

    def _submit(self, what: str, op: str, run_ref: str | None, payload: dict[str, Any]) -> str | None:
        """Sends or journals one call; returns the run id (or placeholder) of ``create_run``. A
        call that fails on the way is journaled *sent*: the server may have done it already."""
        with self._lock:
            if op == "create_run":
                run_ref = self.outbox.new_placeholder(payload["tags"])
            run_id = None if op == "create_run" else self.outbox.resolve(run_ref)
            if not (self.available and self._backlog_cleared()) or (op != "create_run" and run_id is None):
                return self._journal(op, run_ref, payload)
            try:
                created = _send(self.client, op, run_id, payload, placeholder=run_ref)
            except _Rejected as rejected:
                logger.warning("MLflow refused %s: %s", what, rejected)
                self.outbox.append(op, run_ref, payload, state=FAILED, error=str(rejected)[:4000])
                return None
            except Exception as error:
                self._went_down(what, error)
                return self._journal(op, run_ref, payload, state=SENT)
            self._down_since = None
            if created is not None:
                self.outbox.mark(None, run_id=created, placeholder=run_ref)
            return created

    def _journal(self, op: str, run_ref: str | None, payload: dict[str, Any], state: str = PENDING) -> str | None:
        if op == "log_artifact":
            payload = {**payload, "path": self.outbox.keep_file(payload["path"])}
        self.outbox.append(op, run_ref, payload, state=state)
        return run_ref if op == "create_run" else None

    def _call(self, what: str, op: str, run_ref: str | None, payload: dict[str, Any]) -> str | None:
        if op != "create_run" and not run_ref:
            return None
        return self._guard(f"record {what}", lambda: self._submit(what, op, run_ref, payload))

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A read (``fn(client, ...)``), not journaled; None when it fails or the server is down."""
        if not self.available:
            return None
        try:
            return fn(self.client, *args, **kwargs)
        except Exception as error:
            if isinstance(error, MlflowException) and _is_rejection(error):
                logger.warning("MLflow at %s: %s failed (%s)", self.tracking_uri, what, first_line(error))
            else:
                self._went_down(what, error)
            return None

    def find_runs(self, experiment_id: str, tags: Mapping[str, str]) -> list[TrackedRun]:
        """The runs carrying ``tags``, on the server (when it answers) and created through this
        node's outbox; a run closed through the outbox counts as closed even before the server knows."""
        tags = _texts(tags)
        found = self.call(f"search of the runs tagged {tags}", search_tagged_runs, experiment_id, tags) or []
        local = self._guard("read its runs", lambda: self.outbox.tagged_runs(tags), default=[])
        closed_here = {run_id or ref: closed for ref, run_id, _, closed in local}
        runs = {
            run.info.run_id: TrackedRun(run.info.run_id, run.info.status in OPEN_STATUSES and not closed_here.get(run.info.run_id), dict(run.data.tags))
            for run in found
        }  # fmt: skip
        for ref, run_id, run_tags, closed in local:
            if (run_id or ref) not in runs:
                runs[run_id or ref] = TrackedRun(ref if run_id is None else run_id, not closed, run_tags)
        return list(runs.values())

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, Any] | None = None) -> str | None:
        """Creates a RUNNING run; returns its id, or a placeholder while the server is down."""
        payload = {"experiment_id": str(experiment_id), "run_name": run_name, "tags": _texts(tags), "start_time": _now_ms()}
        return self._call(f"create_run {run_name!r}", "create_run", None, payload)

    def reopen(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Sets a closed run RUNNING again (a resumed trial continuing its run)."""
        self._guard("register the run", lambda: self.outbox.set_closed(run_id, False, _texts(tags)))
        self._call(f"reopening run {run_id}", "update_run", run_id, {"status": "RUNNING"})

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, Any], step: int, timestamp_ms: int | None = None) -> None:
        """Logs the finite numeric entries of ``metrics`` at ``step`` (time: now, in ms)."""
        stamp = _now_ms() if timestamp_ms is None else int(timestamp_ms)
        points = [[key, value, stamp, int(step)] for key, value in finite_metrics(metrics).items()]
        if points:
            self._call(f"metrics ({len(points)} at step {step})", "log_batch", run_id, {"metrics": points})

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        """Logs params (values as text, cut to MLflow's 6000 characters)."""
        if params:
            self._call(f"params {list(params)}", "log_batch", run_id, {"params": list(_texts(params, 6000).items())})

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        """Sets tags (values as text, cut to 5000 characters)."""
        if tags:
            self._call(f"tags {list(tags)}", "log_batch", run_id, {"tags": list(_texts(tags, 5000).items())})

    def log_artifact(self, run_id: str | None, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Uploads one file (journaled as a copy, so the source may go away)."""
        if run_id and not Path(path).is_file():
            logger.warning("MLflow artifact %s not logged: no such file", path)
            return
        payload = {"path": str(path), "artifact_path": artifact_path}
        self._call(f"artifact {Path(path).name}", "log_artifact", run_id, payload)

    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        self._call(f"artifact {artifact_file}", "log_text", run_id, {"text": text, "artifact_file": artifact_file})

    def log_figure(self, run_id: str | None, figure, artifact_file: str) -> None:
        """Uploads a matplotlib figure as the image ``artifact_file`` (e.g. ``plots/ratio.png``)."""
        if not run_id:
            return
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                figure.savefig(Path(tmp) / name)
            except Exception as error:
                logger.warning("MLflow figure %s not logged: %s", artifact_file, error)
                return
            self.log_artifact(run_id, Path(tmp) / name, folder or None)

    def terminate(self, run_id: str | None, status: str) -> None:
        """Closes a run with ``status`` (FINISHED, FAILED or KILLED), at the time of this call."""
        if run_id:
            self._guard("register the run's end", lambda: self.outbox.set_closed(run_id, True))
            self._call(f"status {status}", "set_terminated", run_id, {"status": status, "end_time": _now_ms()})
