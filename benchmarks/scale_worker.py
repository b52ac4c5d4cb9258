"""The stand-in's rank-0 worker (``benchmarks/scale_standin.py``): a detectron2 training loop with
the project's hooks, and the server that forks one such worker per training run.

:func:`run_job` is the loop: a detectron2 ``TrainerBase`` whose ``run_step`` sleeps and puts
scalars into the ``EventStorage``, with detectron2's ``EvalHook`` (evaluation:
:func:`scale_standin.standin_results`), the trial's MLflow hooks (``TrialRunHooks`` factories:
``MlflowEventWriter`` in a ``PeriodicWriter``, ``TrialArtifactsHook``) and
:class:`ForwardingReportHook`, the project's ``RayReportHook`` (same reports, same metrics) handing
each report to a callable instead of ``ray.train.report``.

:func:`serve` (``python scale_worker.py SOCKET``, started by ``search_scale.py``) imports
detectron2 and the hooks once, then for every trial that connects forks a worker that receives the
job, sends ``("pid", pid)``, every report as ``("report", metrics)`` and at the end
``("final", metrics)`` or ``("error", message)``. It is single-threaded (safe to fork) and talks to
nobody but the trials on this machine (a Unix socket with a random key from ``$EQLV2_STANDIN_AUTHKEY``).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.engine import TrainerBase
from detectron2.engine.hooks import EvalHook
from scale_standin import (
    AUTHKEY_ENV,
    BEST_QUALITY,
    DIVERGING_ALPHA,
    SERVER_ENV,
    StandInJob,
    curve_quality,
    noise,
    profiled,
    standin_results,
)

import eqlv2.search.mlflow_worker  # noqa: F401  (the hooks, imported once before forking)
from eqlv2.losses.statistics import GradientStatistics
from eqlv2.raytrain.report_hook import RayReportHook

__all__ = ["ForwardingReportHook", "StandInTrainer", "run_job", "serve", "worker_server"]


class _SyntheticStatistics:
    """The trainer's ``gradient_statistics``: per-category ratios that drift with training."""

    def __init__(self, trainer: StandInTrainer) -> None:
        self._trainer = trainer

    def snapshots(self) -> list[GradientStatistics]:
        done = self._trainer.iter + 1
        counts = np.array([2.0] * 4 + [30.0] * 4 + [300.0] * 4)
        pos = counts * done * 0.01
        neg = np.full_like(pos, done * 1.0)
        ratio = pos / (neg + 1e-12)
        return [GradientStatistics(pos_grad=pos, neg_grad=neg, ratio=ratio, q=1.0 + ratio, r=ratio)]


class StandInTrainer(TrainerBase):
    """A detectron2 training loop whose step sleeps and records a falling loss.

    Args:
        values: gamma, mu and alpha.
        max_iter: iterations of the run.
        sleep_per_iter: seconds each step sleeps.
        diverge_at: iteration after which the step raises (None: never).
    """

    def __init__(
        self,
        values: Mapping[str, float],
        max_iter: int,
        sleep_per_iter: float,
        diverge_at: int | None,
    ) -> None:
        super().__init__()
        self.values = dict(values)
        self.max_iter = max_iter
        self.sleep_per_iter = sleep_per_iter
        self.diverge_at = diverge_at
        self.model = torch.nn.Identity()  # no EQL v2 classifier: no weight norms to log
        self.gradient_statistics = _SyntheticStatistics(self)

    def run_step(self) -> None:
        done = self.iter + 1
        if self.diverge_at is not None and done > self.diverge_at:
            raise FloatingPointError(
                f"stand-in loss diverged at iteration {done} (alpha > {DIVERGING_ALPHA})"
            )
        time.sleep(self.sleep_per_iter)
        quality = curve_quality(self.values)
        loss = 2.0 * math.exp(-done / self.max_iter * (1.0 + quality / BEST_QUALITY)) + 0.02 * noise(
            self.values, -done
        )
        self.storage.put_scalars(
            total_loss=loss, loss_cls=0.6 * loss, loss_box_reg=0.4 * loss, lr=0.02
        )


class ForwardingReportHook(RayReportHook):
    """The project's ``RayReportHook`` (same reports, same metrics), each report handed to
    ``forward`` (the trial's translation to Tune) instead of ``ray.train.report``."""

    def __init__(self, cfg: CfgNode, forward: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(cfg)
        self._forward = forward
        self.final: dict[str, Any] = {}

    def report(self, iteration: int, with_checkpoint: bool, evaluated: bool) -> None:
        self.final = self.metrics(iteration, evaluated)
        self._forward(self.final)


def _run_config(job: StandInJob) -> CfgNode:
    """The config keys the hooks read."""
    cfg = CfgNode()
    cfg.SOLVER = CfgNode({"MAX_ITER": job.max_iter, "CHECKPOINT_PERIOD": 0})
    cfg.TEST = CfgNode({"EVAL_PERIOD": job.eval_period})
    cfg.DATASETS = CfgNode({"TRAIN": (), "TEST": ("standin_val",)})
    cfg.MODEL = CfgNode({"EQLV2": CfgNode({"LOG_PERIOD": job.log_period})})
    return cfg


def run_job(job: StandInJob, forward: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Trains the stand-in of ``job``, each report handed to ``forward``; the final report.

    Raises:
        FloatingPointError: the run diverged (``alpha > 7``).
    """
    trainer = StandInTrainer(job.values, job.max_iter, job.sleep_per_iter, job.diverge_at)
    cfg = _run_config(job)
    report_hook = ForwardingReportHook(cfg, forward)
    evaluation = EvalHook(
        job.eval_period,
        lambda: standin_results(job.values, min(trainer.iter + 1, job.max_iter), job.max_iter),
    )
    hooks = [factory(cfg, trainer) for factory in job.hooks]
    trainer.register_hooks([evaluation, *hooks, report_hook])
    trainer.train(0, job.max_iter)
    return report_hook.final


# --- the server -----------------------------------------------------------------------------------


def _worker(conn: Connection) -> int:
    """A forked worker: runs the job it receives, streaming its reports; the exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        job = conn.recv()
        conn.send(("pid", os.getpid()))
        final = profiled("worker", time.process_time, run_job, job, lambda metrics: conn.send(("report", metrics)))
        conn.send(("final", final))
    except (EOFError, OSError):  # the trial went away (stopped or killed): nothing to tell
        return 1
    except Exception as error:  # the run failed (diverged): the trial raises it
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(error).__name__}: {error}"))
    return 0


def serve(address: str, authkey: bytes) -> None:
    """Accepts trials on ``address`` forever, forking one worker per connection."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked workers are reaped by the kernel
    with Listener(address, family="AF_UNIX", authkey=authkey) as listener:
        gc.freeze()  # what is imported stays shared with the workers (no copy on write by the GC)
        print("ready", flush=True)
        os.dup2(2, 1)  # nobody reads the pipe after this line: a worker's output goes to stderr
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError):  # a client that failed the handshake
                continue
            if os.fork() == 0:
                os._exit(_worker(conn))
            conn.close()


@contextlib.contextmanager
def worker_server(folder: str) -> Iterator[None]:
    """Runs :func:`serve` as a subprocess with a socket in ``folder`` and a random key, both set in
    this process's environment (``$EQLV2_STANDIN_SERVER``, ``$EQLV2_STANDIN_AUTHKEY``) for the trial
    processes Ray starts from it; stops it on exit."""
    address = os.path.join(folder, "standin.sock")
    os.environ[SERVER_ENV], os.environ[AUTHKEY_ENV] = address, secrets.token_hex(16)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), address],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the stand-in worker server did not start (exit status {proc.poll()})")
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the server and any worker left
        proc.wait(timeout=30)


if __name__ == "__main__":
    serve(sys.argv[1], bytes.fromhex(os.environ[AUTHKEY_ENV]))
