"""A trial's Ray Train run in an actor the trial owns, its reports relayed by the trial's own thread.

Why: Tune reuses a trial process for the next trial (``reuse_actors``) only if the stopped trial's
function returns within ``TUNE_FUNCTION_THREAD_TIMEOUT_S``. Tune ends a function only where it
waits in ``tune.report``. A trial that called ``TorchTrainer.fit()`` itself would wait in
``fit()`` instead, and the run it started would outlive the stop. So the trial process
(:func:`fit_relayed`) starts a :class:`TrainRunner` on its node, which calls ``fit()`` in a
thread; :class:`RelayCallback` (in the Ray Train controller) hands every rank-0 report to that
runner, and the trial's thread takes them from it and calls ``tune.report``. When Tune stops the
trial, ``tune.report`` raises ``SystemExit`` and the trial kills its runner: the Ray Train
controller and workers it owns go with it (Ray Train's placement-group cleaner frees their
reservation), and the trial process is free for the next trial.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

import ray
from ray import tune
from ray.train import UserCallback
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

#: Builds the run's trainer (``TorchTrainer``) with the given Ray Train callbacks; picklable.
TrainerFactory = Callable[[list], Any]
#: Turns rank 0's report into the result Tune receives; picklable.
Translate = Callable[[Mapping[str, Any]], dict]


class RelayCallback(UserCallback):
    """Runs in the Ray Train controller: hands rank 0's reports, translated, to the trial's runner
    (in order: each waits until the runner has queued it)."""

    def __init__(self, translate: Translate, runner) -> None:
        self._translate = translate
        self._runner = runner

    def after_report(self, run_context, metrics, checkpoint) -> None:
        translated = self._translate(dict(metrics[0]) if metrics else {})
        if checkpoint is not None:  # as Ray Tune's own TuneReportCallback does
            translated["checkpoint_path"] = checkpoint.path
        ray.get(self._runner.put.remote(("report", translated)))


class TrainRunner:
    """Fits one trainer in a thread and queues its reports, then ``("final", metrics)`` or
    ``("error", exception)``, for :meth:`next`. Killed by its trial when Tune stops it."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()

    def start(self, make_trainer: TrainerFactory, translate: Translate) -> None:
        callback = RelayCallback(translate, ray.get_runtime_context().current_actor)
        threading.Thread(target=self._fit, args=(make_trainer, callback), daemon=True).start()

    def _fit(self, make_trainer: TrainerFactory, callback: RelayCallback) -> None:
        try:
            result = make_trainer([callback]).fit()
            if result.error is not None:
                raise result.error
            self._queue.put(("final", dict(result.metrics or {})))
        except Exception as error:  # the trial raises it
            self._queue.put(("error", _picklable(error)))

    def put(self, item: tuple[str, Any]) -> None:
        self._queue.put(item)

    def next(self) -> tuple[str, Any]:
        return self._queue.get()


def _picklable(error: Exception) -> Exception:
    """The error itself if Ray can send it to the trial, else a RuntimeError with its text."""
    try:
        ray.cloudpickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def fit_relayed(make_trainer: TrainerFactory, translate: Translate) -> dict:
    """Called by a Tune trial: fits the trainer in a :class:`TrainRunner` on this node, passes each
    translated report to ``tune.report``, and returns rank 0's final report (or raises the run's
    error). The runner is killed on the way out, whatever the way (Tune's stop included)."""
    node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    runner = ray.remote(TrainRunner).options(num_cpus=0, max_concurrency=4, scheduling_strategy=node).remote()
    try:
        runner.start.remote(make_trainer, translate)
        while True:
            kind, payload = ray.get(runner.next.remote())
            if kind == "report":
                tune.report(payload)  # raises SystemExit when Tune stops the trial
            elif kind == "final":
                return payload
            else:
                raise payload
    finally:
        ray.kill(runner)
