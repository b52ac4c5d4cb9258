"""A durable outbox for MLflow: calls made while the tracking server is unreachable are kept on
local disk, in order, and replayed exactly once when it is back.

One outbox per node (:func:`node_outbox`, ``<results dir>/mlflow_outbox/<hostname>``, on a local
disk: ``flock`` is not safe on NFS), bound to one tracking URI, without credentials. The driver,
its trials and their rank-0 workers append to its journal ``outbox.jsonl`` (one JSON object a
line, under ``flock``, fsynced), so their calls are replayed in the order they were made,
whichever process replays; each process folds the lines it has not read yet (:meth:`Outbox._fold`).

Exactly once: an entry is marked *sent* before its call goes out and *done* (with the
placeholder's real run id, in the same line) after it returns. A *sent* entry may already be on
the server, so its replay checks first: a run is created with the tag :data:`OUTBOX_RUN_TAG` =
its placeholder and an existing run with it is reused; metric points and params the run holds
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
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from .mlflow_client import TRIAL_HTTP_LIMITS, finite_metrics, first_line, search_tagged_runs

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
JOURNAL = "outbox.jsonl"
#: The journal of the SQLite outbox of earlier versions (:func:`warn_legacy_outbox`).
LEGACY_JOURNAL = "outbox.sqlite"


def is_placeholder(run_ref: str | None) -> bool:
    return bool(run_ref) and str(run_ref).startswith(PLACEHOLDER_PREFIX)


def node_outbox(root: str | os.PathLike) -> Path:
    """This node's outbox folder under ``root`` (``<root>/<hostname>``)."""
    return Path(root).expanduser().resolve() / socket.gethostname()


def outbox_folders(root: str | os.PathLike) -> list[Path]:
    """The outbox folders under ``root`` (one per node that wrote there), sorted."""
    for legacy in Path(root).glob(f"*/{LEGACY_JOURNAL}"):
        warn_legacy_outbox(legacy.parent)
    return sorted(path.parent for path in Path(root).glob(f"*/{JOURNAL}"))


def warn_legacy_outbox(folder: Path) -> None:
    """Names an outbox of the SQLite format (eqlv2 up to commit 3fb4294), which this one does not
    replay, so its calls are not silently left behind."""
    if (folder / LEGACY_JOURNAL).exists():
        logger.warning(
            "%s holds MLflow calls in the outbox format of an earlier eqlv2 (SQLite), which this version "
            "does not replay: replay them with that version (git checkout 3fb4294, then python tune/search.py "
            "--sync --results-dir ...) before deleting the file", folder / LEGACY_JOURNAL,
        )  # fmt: skip


@dataclass
class JournalEntry:
    """One journaled call: ``op`` is ``create_run``, ``log_batch``, ``log_artifact``, ``log_text``,
    ``update_run`` or ``set_terminated``; ``payload`` its JSON-able keyword arguments."""

    seq: int
    op: str
    run_ref: str | None
    payload: dict[str, Any]
    state: str = PENDING
    error: str | None = None
    created: float = 0.0


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
        warn_legacy_outbox(self.folder)
        self.tracking_uri: str | None = None
        self._read = 0  # bytes of the journal folded into the fields below
        self._entries: dict[int, JournalEntry] = {}  # by sequence number, from 1
        self._open: dict[int, JournalEntry] = {}  # pending or sent, oldest first
        self._runs: dict[str, dict[str, Any]] = {}  # placeholder (or run id) -> run_id, tags, closed
        self._sync()
        if self.tracking_uri is None and tracking_uri is not None:
            self._sync({"uri": tracking_uri})
        if self.tracking_uri is None:
            raise ValueError(f"{self.folder} holds no MLflow outbox: give its tracking URI")
        if tracking_uri is not None and self.tracking_uri != tracking_uri:
            raise ValueError(
                f"the MLflow outbox {self.folder} belongs to {self.tracking_uri}, not {tracking_uri}: replay it "
                "there first, or give another outbox folder"
            )

    def _sync(self, *records: dict[str, Any]) -> None:
        """Folds what other processes appended, then appends ``records`` durably, under the lock
        (shared by readers, exclusive for appends)."""
        with open(self.folder / JOURNAL, "a+b") as journal:
            fcntl.flock(journal, fcntl.LOCK_EX if records else fcntl.LOCK_SH)  # released on close
            journal.seek(self._read)
            data = journal.read()
            complete = data.rfind(b"\n") + 1
            lines, end = data[:complete].splitlines(), self._read + complete
            if records:
                if complete < len(data):  # a line cut by a crash: ended here, then read as any line
                    lines.append(data[complete:])
                    journal.write(b"\n")
                lines += [json.dumps(record).encode() for record in records]
                journal.write(b"".join(line + b"\n" for line in lines[-len(records) :]))
                journal.flush()
                os.fsync(journal.fileno())
                end = journal.tell()
        for line in lines:
            try:
                self._fold(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError):  # the same in every process
                logger.warning("MLflow outbox %s: skipped an unreadable line (cut by a crash?)", self.folder)
        self._read = end

    def _fold(self, record: dict[str, Any]) -> None:
        """Applies one line: the binding ``{"uri"}``; a call ``{"op", "run_ref", "payload", "state",
        "error", "created"}`` (its ``seq`` is its rank among the calls); a state change ``{"seq",
        "state", "error"}``; a run created here ``{"placeholder", "tags"}`` or its id ``{"placeholder",
        "run_id"}``; a run closed or reopened here ``{"closed", "ref", "tags"}``."""
        self.tracking_uri = self.tracking_uri or record.get("uri")
        if "op" in record:
            entry = JournalEntry(len(self._entries) + 1, **record)
            self._entries[entry.seq] = entry
        elif "seq" in record:
            entry = self._entries[record["seq"]]
            entry.state, entry.error = record["state"], record.get("error")
        if "op" in record or "seq" in record:
            if entry.state in (PENDING, SENT):
                self._open[entry.seq] = entry
            else:
                self._open.pop(entry.seq, None)
        if "placeholder" in record:
            run = self._runs.setdefault(record["placeholder"], {"run_id": None, "tags": {}, "closed": False})
            run.update({key: record[key] for key in ("run_id", "tags") if key in record})
        if "closed" in record:  # a run id or placeholder; a run not registered yet is added with its tags
            known = [run for key, run in self._runs.items() if record["ref"] in (key, run["run_id"])]
            for run in known:
                run["closed"] = record["closed"]
            if not known and record["tags"] is not None:
                self._runs[record["ref"]] = {"run_id": record["ref"], "tags": record["tags"], "closed": record["closed"]}

    def append(self, op: str, run_ref: str | None, payload: Mapping[str, Any], state: str = PENDING, error: str | None = None) -> int:
        """Journals one call durably; returns its sequence number."""
        self._sync({"op": op, "run_ref": run_ref, "payload": dict(payload), "state": state, "error": error, "created": time.time()})
        return len(self._entries)

    def new_placeholder(self, tags: Mapping[str, str] | None = None) -> str:
        """A fresh placeholder run id, registered unmapped with the run's ``tags``."""
        placeholder = f"{PLACEHOLDER_PREFIX}{uuid.uuid4().hex}"
        self._sync({"placeholder": placeholder, "tags": dict(tags or {})})
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
        """Sets entry ``seq``'s state (None: no entry) and maps ``placeholder`` to ``run_id``, in one line."""
        record = {} if seq is None else {"seq": seq, "state": state, "error": error}
        self._sync({**record, **({"placeholder": placeholder, "run_id": run_id} if placeholder and run_id else {})})

    def set_closed(self, run_ref: str, closed: bool, tags: Mapping[str, str] | None = None) -> None:
        """Records that ``run_ref`` was closed (or reopened) through this outbox; a run the
        outbox does not know yet is added with ``tags``."""
        self._sync({"closed": closed, "ref": run_ref, "tags": None if tags is None else dict(tags)})

    def resolve(self, run_ref: str | None) -> str | None:
        """The MLflow run id of ``run_ref`` (None: a placeholder whose run is not created yet)."""
        if not is_placeholder(run_ref):
            return run_ref
        self._sync()
        return self._runs.get(run_ref, {}).get("run_id")

    def next_entry(self) -> JournalEntry | None:
        """The oldest entry still to send (pending or sent)."""
        self._sync()
        return next(iter(self._open.values()), None)

    def count(self, *states: str) -> int:
        self._sync()
        return sum(entry.state in states for entry in self._entries.values())

    def pending(self) -> int:
        """Entries still to send (pending or sent)."""
        self._sync()
        return len(self._open)

    def report(self, since: float = 0.0) -> ReplayReport:
        """What the outbox holds: entries done and rejected since ``since`` (epoch s), all pending."""
        pending = self.pending()
        recent = [entry for entry in self._entries.values() if entry.created >= since]
        return ReplayReport(
            replayed=dict(Counter(entry.op for entry in recent if entry.state == DONE)),
            failed=[(entry.seq, entry.op, entry.error or "") for entry in recent if entry.state == FAILED],
            pending=pending,
            runs={ref: run["run_id"] for ref, run in self._runs.items() if is_placeholder(ref)},
        )

    def tagged_runs(self, tags: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """The runs created or closed here carrying every tag of ``tags``: run id (or placeholder)
        -> ``{"run_id", "tags", "closed"}``."""
        self._sync()
        return {run["run_id"] or ref: run for ref, run in self._runs.items() if tags.items() <= run["tags"].items()}

    @contextmanager
    def replay_lock(self, blocking: bool) -> Iterator[bool]:
        """Holds the folder's replay lock (one replayer at a time); yields whether it got it."""
        with open(self.folder / "replay.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True  # released when the file is closed


def pending_count(folder: str | os.PathLike) -> int:
    """Entries of the outbox in ``folder`` not yet on the server (0 if there is no outbox)."""
    return Outbox(folder).pending() if (Path(folder) / JOURNAL).exists() else 0


# --- sending one entry ----------------------------------------------------------------------------


def _is_rejection(error: BaseException) -> bool:
    """Whether the server answered and refused the call, or it cannot be made: not retried."""
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


def _send(client: MlflowClient, op: str, run_ref: str | None, run_id: str | None, payload: dict[str, Any], resent: bool = False) -> str | None:
    """Makes one call (``run_ref``: as journaled, the placeholder of a ``create_run``; ``run_id``:
    MLflow's id); returns the new run id of ``create_run``. Raises what :func:`_is_rejection` sorts."""
    if op == "create_run":  # tagged with its placeholder; resent, it reuses a run so tagged
        if resent and (found := search_tagged_runs(client, payload["experiment_id"], {OUTBOX_RUN_TAG: run_ref})):
            return found[0].info.run_id
        return client.create_run(**{**payload, "tags": {**payload["tags"], OUTBOX_RUN_TAG: run_ref}}).info.run_id
    if run_id is None:
        raise ValueError("its run was never created (the create_run entry failed)")
    if op == "log_batch":
        _log_batch(client, run_id, payload, resent)
    elif op == "log_artifact" and not Path(payload["local_path"]).is_file():
        raise ValueError(f"the file {payload['local_path']} is gone")
    else:  # log_artifact, log_text, update_run, set_terminated
        getattr(client, op)(run_id, **payload)
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


def _replay_entry(outbox: Outbox, client: MlflowClient, entry: JournalEntry, replayed: Counter, progress: Progress | None) -> None:
    resent = entry.state == SENT
    if not resent:
        outbox.mark(entry.seq, SENT)
    try:
        run_id = None if entry.op == "create_run" else outbox.resolve(entry.run_ref)
        new_run = _send(client, entry.op, entry.run_ref, run_id, entry.payload, resent)
    except Exception as error:
        if not _is_rejection(error):
            raise
        logger.warning("MLflow refused journaled call %d (%s): %s", entry.seq, entry.op, error)
        outbox.mark(entry.seq, FAILED, error=f"{type(error).__name__}: {error}"[:4000])
        return
    if progress is not None:
        progress(entry)
    outbox.mark(entry.seq, DONE, run_id=new_run, placeholder=entry.run_ref)
    replayed[entry.op] += 1
    if entry.op == "log_artifact":
        shutil.rmtree(Path(entry.payload["local_path"]).parent, ignore_errors=True)


def replay_outbox(outbox: Outbox, client: MlflowClient, *, blocking: bool = True, progress: Progress | None = None) -> ReplayReport:
    """Sends ``outbox``'s pending entries in order with ``client`` (see :func:`replay`)."""
    replayed: Counter = Counter()
    with outbox.replay_lock(blocking) as locked:
        error = None if locked else "another process is replaying this outbox"
        try:
            while locked and (entry := outbox.next_entry()) is not None:
                _replay_entry(outbox, client, entry, replayed, progress)
        except Exception as failure:  # the server went away again: the rest stays pending
            error = f"{type(failure).__name__}: {first_line(failure)}"
    report = outbox.report()
    report.replayed, report.error = dict(replayed), error
    return report


def replay(folder: str | os.PathLike, tracking_uri: str | None = None, *, progress: Progress | None = None) -> ReplayReport:
    """Replays the outbox in ``folder`` to its tracking server, in order, exactly once.

    Safe at any time from any process of the node (one replays at a time; others wait).
    ``progress`` is called with each entry after the server accepted it and before it is marked
    done; an exception raised there stops the replay like a crash.
    """
    outbox = Outbox(folder, tracking_uri)
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
        report.add(Outbox(folder).report(since))
    return report


# --- the client the search uses -------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _metric_points(metrics: Mapping[str, Any] | None, step: int, stamp_ms: int) -> list[list[Any]]:
    """The journal's ``[key, value, time in ms, step]`` of each finite numeric entry of ``metrics``."""
    return [[key, value, stamp_ms, int(step)] for key, value in finite_metrics(metrics or {}).items()]


def _texts(values: Mapping[str, Any] | None, limit: int | None = None) -> dict[str, str]:
    return {str(k): str(v)[:limit] for k, v in (values or {}).items()}


class DurableMlflow:
    """A never-raising MLflow client that journals what it cannot send (see the module docstring).

    Each call: if the server was unreachable less than ``retry_after`` seconds ago, it is
    journaled at once (no waiting on a dead server); otherwise the backlog is replayed first and,
    once nothing is pending, the call is sent, and journaled if the server is unreachable.
    Metric points given to :meth:`defer_metrics` wait in memory and go out in one batch with the
    run's next call, once the oldest has waited ``within`` seconds, or on :meth:`flush`.
    Picklable: the copy opens the outbox in its process. ``outbox_dir`` must be on a local disk
    of this node (:func:`node_outbox`).
    """

    def __init__(self, tracking_uri: str, outbox_dir: str | os.PathLike, retry_after: float = 30.0) -> None:
        self.tracking_uri = tracking_uri
        self.outbox_dir = str(Path(outbox_dir).expanduser().resolve())
        self.retry_after = retry_after
        self._down_since: float | None = None
        self._lock = threading.RLock()
        self._deferred: dict[str, list[list[Any]]] = {}  # run ref -> [key, value, ms, step] points

    @classmethod
    def on_node(cls, tracking_uri: str, outbox_root: str | os.PathLike, short_retries: bool = False) -> DurableMlflow:
        """The client of this node's outbox under the search's ``outbox_root``; with
        ``short_retries`` (trial and rank-0 worker processes) a dead server does not stall it."""
        if short_retries:
            os.environ.update(TRIAL_HTTP_LIMITS)
        return cls(tracking_uri, node_outbox(outbox_root))

    def __getstate__(self) -> dict[str, Any]:
        return {key: self.__dict__[key] for key in ("tracking_uri", "outbox_dir", "retry_after")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @cached_property
    def outbox(self) -> Outbox:
        return Outbox(self.outbox_dir, self.tracking_uri)

    @cached_property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    @property
    def available(self) -> bool:
        """False while calls are journaled without trying, after the server was unreachable."""
        return self._down_since is None or time.monotonic() - self._down_since >= self.retry_after

    def pending(self) -> int:
        """Entries of the outbox not yet on the server (of every process using it); -1 if unreadable."""
        return self._guard("count the outbox", lambda: self.outbox.pending(), default=-1)

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

    def _replay(self, blocking: bool) -> ReplayReport:
        report = replay_outbox(self.outbox, self.client, blocking=blocking)
        if report.replayed and not blocking:
            logger.warning("MLflow at %s is back: %s", self.tracking_uri, report.summary())
        if report.pending and report.error and "another process" not in report.error:
            self._went_down("replay", report.error)
        elif not report.pending:
            self._down_since = None
        return report

    def flush(self) -> ReplayReport:
        """Sends the deferred points, then replays the backlog now, waiting for another process's
        replay; never raises."""
        with self._lock:
            self.send_deferred()
            failed = ReplayReport(error="the outbox could not be read", pending=-1)
            return self._guard("replay", lambda: self._replay(blocking=True), default=failed)

    def _backlog_cleared(self) -> bool:
        return self.outbox.pending() == 0 or self._replay(blocking=False).pending == 0

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
                created = _send(self.client, op, run_ref, run_id, payload)
            except Exception as error:
                if not _is_rejection(error):
                    self._went_down(what, error)
                    return self._journal(op, run_ref, payload, state=SENT)
                logger.warning("MLflow refused %s: %s", what, error)
                self.outbox.append(op, run_ref, payload, state=FAILED, error=f"{type(error).__name__}: {error}"[:4000])
                return None
            self._down_since = None
            if created is not None:
                self.outbox.mark(None, run_id=created, placeholder=run_ref)
            return created

    def _journal(self, op: str, run_ref: str | None, payload: dict[str, Any], state: str = PENDING) -> str | None:
        if op == "log_artifact":
            payload = {**payload, "local_path": self.outbox.keep_file(payload["local_path"])}
        self.outbox.append(op, run_ref, payload, state=state)
        return run_ref if op == "create_run" else None

    def _call(self, what: str, op: str, run_ref: str | None, payload: dict[str, Any]) -> str | None:
        if op != "create_run" and not run_ref:
            return None
        with self._lock:  # the run's deferred points go first (in the same batch, for log_batch)
            deferred = self._deferred.pop(run_ref, []) if run_ref else []
            if deferred and op == "log_batch":
                payload = {**payload, "metrics": deferred + payload.get("metrics", [])}
            elif deferred:
                self._guard("record deferred metrics", lambda: self._submit("deferred metrics", "log_batch", run_ref, {"metrics": deferred}))
            if op == "log_batch" and not payload:
                return None
            return self._guard(f"record {what}", lambda: self._submit(what, op, run_ref, payload))

    def send_deferred(self, run_id: str | None = None) -> None:
        """Sends the deferred points of ``run_id`` (None: of every run) now, one batch a run."""
        with self._lock:
            for run_ref in [run_id] if run_id else list(self._deferred):
                self._call("deferred metrics", "log_batch", run_ref, {})

    def defer_metrics(self, run_id: str | None, metrics: Mapping[str, Any], step: int, within: float = 30.0) -> None:
        """Keeps the finite numeric entries of ``metrics`` at ``step`` (time: now) for the run's next
        call; sends them all once the oldest has waited ``within`` seconds. Points still waiting
        when the process is killed are lost: call :meth:`flush` before it ends."""
        if not run_id:
            return
        with self._lock:
            points = self._deferred.setdefault(run_id, [])
            points += _metric_points(metrics, step, _now_ms())
            if points and _now_ms() - points[0][2] >= within * 1000:  # the oldest point's time
                self.send_deferred(run_id)

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
        local = self._guard("read its runs", lambda: self.outbox.tagged_runs(tags), default={})
        runs = {
            run.info.run_id: TrackedRun(run.info.run_id, run.info.status in OPEN_STATUSES and not local.get(run.info.run_id, {}).get("closed"), dict(run.data.tags))
            for run in found
        }  # fmt: skip
        for ref, run in local.items():
            runs.setdefault(ref, TrackedRun(ref, not run["closed"], run["tags"]))
        return list(runs.values())

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, Any] | None = None) -> str | None:
        """Creates a RUNNING run; returns its id, or a placeholder while the server is down."""
        payload = {"experiment_id": str(experiment_id), "run_name": run_name, "tags": _texts(tags), "start_time": _now_ms()}
        return self._call(f"create_run {run_name!r}", "create_run", None, payload)

    def reopen(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Sets a closed run RUNNING again (a resumed trial continuing its run)."""
        self._guard("register the run", lambda: self.outbox.set_closed(run_id, False, _texts(tags)))
        self._call(f"reopening run {run_id}", "update_run", run_id, {"status": "RUNNING"})

    def log_batch(
        self, run_id: str | None, *, metrics: Mapping[str, Any] | None = None, step: int = 0,
        params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None, timestamp_ms: int | None = None,
    ) -> None:  # fmt: skip
        """One request: the finite numeric entries of ``metrics`` at ``step`` (time: now, in ms),
        ``params`` (text, cut to MLflow's 6000 characters) and ``tags`` (text, cut to 5000)."""
        stamp = _now_ms() if timestamp_ms is None else int(timestamp_ms)
        payload: dict[str, Any] = {
            "metrics": _metric_points(metrics, step, stamp),
            "params": list(_texts(params, 6000).items()),
            "tags": list(_texts(tags, 5000).items()),
        }
        payload = {kind: entries for kind, entries in payload.items() if entries}
        if payload:
            what = [f"metrics ({len(e)} at step {step})" if k == "metrics" else f"{k} {[n for n, _ in e]}" for k, e in payload.items()]
            self._call(", ".join(what), "log_batch", run_id, payload)

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, Any], step: int, timestamp_ms: int | None = None) -> None:
        """Logs the finite numeric entries of ``metrics`` at ``step`` (time: now, in ms)."""
        self.log_batch(run_id, metrics=metrics, step=step, timestamp_ms=timestamp_ms)

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        """Logs params (values as text, cut to MLflow's 6000 characters)."""
        self.log_batch(run_id, params=params)

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        """Sets tags (values as text, cut to 5000 characters)."""
        self.log_batch(run_id, tags=tags)

    def log_artifact(self, run_id: str | None, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Uploads one file (journaled as a copy, so the source may go away)."""
        if run_id and not Path(path).is_file():
            logger.warning("MLflow artifact %s not logged: no such file", path)
            return
        self._call(f"artifact {Path(path).name}", "log_artifact", run_id, {"local_path": str(path), "artifact_path": artifact_path})

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
