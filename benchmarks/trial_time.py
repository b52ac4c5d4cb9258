"""Where the wall time of one default search trial goes: start-up, training steps, evaluation.

Runs one trial the way ``tune/search.py`` runs each of its trials, in one run: a Ray Tune
function trainable (no CPU of its own) that builds a Ray Train ``TorchTrainer`` with
``build_torch_trainer`` (benchmarks/default_trial.py) -- the LVIS tiny config with the default
search space's ``trial_overrides`` (``configs/search/default.yaml``) at the paper's point
(gamma 12, mu 0.8, alpha 4), 1 worker x 1 CPU -- and ``fit()``\\ s it. What a search does once
and not per trial comes first and is timed apart: generating the benchmark, training the base
checkpoint (both cached), starting Ray.

A hook on rank 0 records wall-clock times at every step. The trial's wall time (``Tuner.fit``)
is split into

* start-up: from the start of ``fit`` to the first training step (Tune's trial actor, the Ray
  Train worker group, imports, model, data loading, base weights);
* training steps: every iteration's forward, backward, all-reduce and update (each step timed
  from the hook's ``before_step`` to its ``after_step``; steps that ran a periodic evaluation
  count the median step instead, the rest is evaluation);
* evaluation: periodic evaluations and the final one (inference and the LVIS evaluation);
* other: the rest (reports, the final checkpoint, tear-down).

Goal: training steps >= 60% of the trial. Timings depend on the load of the machine; the
load average at the start and the end is printed with the figures.

Usage: ``python benchmarks/trial_time.py [--dataset lvis|openimages] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from detectron2.engine import HookBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_trial import (  # noqa: E402
    CONFIGS,
    NUM_WORKERS,
    PAPER_POINT,
    fit_trial,
    prepare,
    trial_opts,
    use_project_benchmark,
)

TARGET_TRAINING_SHARE = 0.60
TIMES_FILE = "trial_times.json"


class StepClock(HookBase):
    """Rank 0: wall-clock times of every step and of the end of training, written to a file."""

    def __init__(self, path: str, eval_period: int) -> None:
        self._path = path
        self._eval_period = eval_period
        self._steps: list[tuple[int, float, float]] = []

    def before_step(self) -> None:
        self._start = time.time()

    def after_step(self) -> None:
        self._steps.append((self.trainer.iter, self._start, time.time()))

    def after_train(self) -> None:
        # Runs after detectron2's EvalHook (registered earlier), so the final evaluation is over.
        times = {"steps": self._steps, "after_train": time.time(), "eval_period": self._eval_period}
        Path(self._path).write_text(json.dumps(times))


def step_clock_factory(cfg, trainer) -> StepClock:
    """Hook factory for ``build_torch_trainer(extra_hooks=...)``."""
    return StepClock(os.path.join(cfg.OUTPUT_DIR, TIMES_FILE), cfg.TEST.EVAL_PERIOD)


def _trainable(config: dict[str, Any]) -> None:
    from ray import tune

    metrics = fit_trial(config["config_file"], config["opts"], config["output_dir"], [step_clock_factory])
    tune.report(metrics)


def split_times(times: dict[str, Any], fit_start: float, fit_end: float) -> dict[str, float]:
    """Seconds of start-up, training steps, evaluation and other, from the hook's record."""
    steps = times["steps"]
    period = int(times["eval_period"])
    durations = [end - start for _, start, end in steps]
    median = statistics.median(durations)
    evaluated = {i for i, (it, _, _) in enumerate(steps) if period > 0 and (it + 1) % period == 0 and i < len(steps) - 1}
    training = sum(median if i in evaluated else d for i, d in enumerate(durations))
    periodic_eval = sum(durations[i] - median for i in evaluated)
    final_eval = times["after_train"] - steps[-1][2]
    startup = steps[0][1] - fit_start
    # Gaps between steps (data loading is inside run_step; what is left are hook calls).
    gaps = sum(max(0.0, steps[i + 1][1] - steps[i][2]) for i in range(len(steps) - 1))
    wall = fit_end - fit_start
    evaluation = periodic_eval + final_eval
    return {
        "wall": wall,
        "startup": startup,
        "training_steps": training,
        "evaluation": evaluation,
        "other": wall - startup - training - evaluation,
        "between_steps": gaps,
        "iterations": len(steps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(CONFIGS), default="lvis")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    import ray
    from ray import tune

    config_file = str(CONFIGS[args.dataset])
    opts = trial_opts(PAPER_POINT, seed=0)
    use_project_benchmark()
    prepared = prepare(config_file, opts)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             resources={"eqlv2_trial": 10})  # fmt: skip
    ray_start = time.perf_counter() - start
    try:
        with tempfile.TemporaryDirectory(prefix="eqlv2-trial-time-") as work:
            output_dir = os.path.join(work, "detectron2")
            tuner = tune.Tuner(
                tune.with_resources(_trainable, {"eqlv2_trial": 1}),
                param_space={"config_file": config_file, "opts": opts, "output_dir": output_dir},
                tune_config=tune.TuneConfig(num_samples=1),
                run_config=tune.RunConfig(storage_path=os.path.join(work, "tune"), name="trial_time", verbose=0),
            )
            fit_start = time.time()
            results = tuner.fit()
            fit_end = time.time()
            if results.errors:
                print(f"the trial failed: {results.errors[0]}", file=sys.stderr)
                return 1
            times = json.loads(Path(output_dir, TIMES_FILE).read_text())
            metrics = results[0].metrics
    finally:
        ray.shutdown()
    split = split_times(times, fit_start, fit_end)
    _print(args.dataset, split, prepared, ray_start, metrics, load_start, os.getloadavg()[0])
    if args.json:
        Path(args.json).write_text(json.dumps({"split": split, "prepare_s": prepared, "ray_init_s": ray_start}, indent=1))
    return 0 if split["training_steps"] / split["wall"] >= TARGET_TRAINING_SHARE else 2


def _print(dataset, split, prepare, ray_start, metrics, load_start, load_end) -> None:
    wall = split["wall"]
    print(f"\nOne default {dataset} trial (paper point, {split['iterations']} iterations, {NUM_WORKERS} Ray Train worker(s) x 1 CPU)")
    print(f"load average at start / end: {load_start:.1f} / {load_end:.1f} (2 cores)")
    print(f"once per search, not per trial: data + base checkpoint {prepare:.1f} s (cached if already built), ray.init {ray_start:.1f} s")
    print(f"{'part':<16}{'seconds':>9}{'share':>8}")
    for key in ("startup", "training_steps", "evaluation", "other"):
        print(f"{key:<16}{split[key]:>9.1f}{split[key] / wall:>8.0%}")
    print(f"{'trial wall time':<16}{wall:>9.1f}{1:>8.0%}")
    share = split["training_steps"] / wall
    verdict = "meets" if share >= TARGET_TRAINING_SHARE else "misses"
    print(f"training steps: {share:.0%} of the trial ({verdict} the goal of >= {TARGET_TRAINING_SHARE:.0%})")
    shown = {k: round(v, 2) for k, v in metrics.items() if k in ("AP", "APr", "APc", "APf", "APb")}
    if shown:
        print(f"the trial's result: {shown}")


if __name__ == "__main__":
    raise SystemExit(main())
