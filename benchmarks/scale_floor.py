"""The least CPU a search trial can cost on this machine: Ray Tune's own, plus the least tracking.

``benchmarks/search_scale.py`` measures the project's search at 500 trials and concurrency 32.
This script measures what no implementation of that search can go below, with the same schedule
(``scale_standin``'s: 200 iterations, a report every 20 and an evaluation every 50, 0.5 s of
sleep per 20 iterations), in one run:

1. **Bare Ray Tune**: the search's Tune set-up (an Optuna TPE searcher, in memory, behind a
   ``ConcurrencyLimiter`` that stages ``concurrency // 4`` trials beyond the ``concurrency``
   CPUs Ray offers, as the search does, so that a finished trial's process is reused; the
   search's ASHA, ``build_scheduler("asha", ...)``; ``reuse_actors=True``) with a
   trainable that only sleeps and calls ``tune.report`` on the schedule. No project code, no
   store, no training process.
2. **The least tracking the issue asks for**, against a PostgreSQL-backed MLflow server and
   Optuna on PostgreSQL (``configs/cluster/head_services.sh``, as the tests start them), from
   one warm client: per trial one MLflow child run with its params, its whole metric history
   in one ``log_batch``, one gradient-statistics table and its end (5 requests); and an Optuna
   trial asked, given 3 intermediate values and told, with TPE.

CPU is the machine's (``/proc/stat``: every process), per trial. 2 cores give 120 CPU seconds a
minute (``os.cpu_count()`` x 60 in general), so N trials a minute leave 120 / N CPU seconds a
trial. Printed: each part, their sum (the floor) and the trials per minute the floor allows.

Usage: ``python benchmarks/scale_floor.py [--trials 500] [--concurrency 32] [--tracked 100]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from local_services import database_url, mlflow_uri, run_head_services, services_env
from search_scale import machine_cpu_seconds, parse_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from eqlv2.search.optuna_study import STEP_KEY, build_scheduler  # noqa: E402 (this checkout's)

_SCALE = parse_args([])  # search_scale.py's defaults: the schedule
ITERATIONS, EVAL_PERIOD = _SCALE.iterations, _SCALE.eval_period
LOG_PERIOD, STEP_SECONDS = _SCALE.log_period, _SCALE.step_seconds


def bare_trainable(config: dict) -> None:
    """Sleeps and reports on the stand-in's schedule (``objective`` grows with the iterations)."""
    from ray import tune

    # scale_standin.standin_quality, written out: importing that module would load MLflow and
    # Optuna into every trial process, which bare Ray Tune does not.
    quality = (
        30.0
        - 0.15 * (config["gamma"] - 10) ** 2
        - 40 * (config["mu"] - 0.75) ** 2
        - 0.6 * (config["alpha"] - 3) ** 2
    )
    for iteration in range(1, ITERATIONS + 1):
        if iteration % LOG_PERIOD == 0:
            time.sleep(STEP_SECONDS)
        if iteration % LOG_PERIOD == 0 or iteration % EVAL_PERIOD == 0:
            metrics = {
                "iteration": iteration,
                STEP_KEY: iteration // EVAL_PERIOD,
                "total_loss": 1.0 / iteration,
            }
            tune.report({**metrics, "objective": quality * iteration / ITERATIONS})


def bare_tune(trials: int, concurrency: int) -> dict[str, float]:
    """Part 1 (the module docstring): trials per minute and machine CPU seconds per trial."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from eqlv2.search.ray_local import local_ray

    space = {
        "gamma": tune.uniform(4, 16),
        "mu": tune.uniform(0.5, 1.0),
        "alpha": tune.uniform(0, 8),
    }
    asha = build_scheduler("asha", ITERATIONS // EVAL_PERIOD)  # the search's, its defaults
    # As driver._staged_trials stages them on the local instance (its slots are a custom
    # resource there, CPUs here).
    staged = concurrency + max(1, concurrency // 4)
    searcher = ConcurrencyLimiter(OptunaSearch(metric="objective", mode="max"), max_concurrent=staged)
    with (
        tempfile.TemporaryDirectory(prefix="eqlv2-floor-") as folder,
        local_ray(num_cpus=concurrency, include_dashboard=False),
    ):
        tuner = tune.Tuner(
            bare_trainable, param_space=space,
            tune_config=tune.TuneConfig(num_samples=trials, search_alg=searcher, scheduler=asha, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=folder, verbose=0),
        )  # fmt: skip
        cpu, start = machine_cpu_seconds(), time.monotonic()
        errors = len(tuner.fit().errors)
        wall, cpu = time.monotonic() - start, machine_cpu_seconds() - cpu
    return {
        "trials_per_minute": trials / wall * 60,
        "cpu_per_trial": cpu / trials,
        "errors": errors,
    }


def least_mlflow_trial(client, experiment_id: str, parent: str, table: str) -> str:
    """One trial's least tracking: child run, params, metric history, one table, end; its run id."""
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    params = {"gamma": 10.0, "mu": 0.8, "alpha": 3.0, "seed": 42, "objective": "segm/AP"}
    client.log_batch(run, params=[Param(key, str(value)) for key, value in params.items()])
    now = int(time.time() * 1000)
    losses = [
        Metric(f"lvis/{k}", 1.0 / s, now, s)
        for s in range(LOG_PERIOD, ITERATIONS + 1, LOG_PERIOD)
        for k in ("total_loss", "lr")
    ]
    results = [
        Metric(f"lvis/{k}", 20.0, now, s)
        for s in range(EVAL_PERIOD, ITERATIONS + 1, EVAL_PERIOD)
        for k in ("AP", "APr", "APc", "APf")
    ]
    client.log_batch(run, metrics=losses + results)
    client.log_text(run, table, f"gradient_statistics/lvis/iter_{ITERATIONS:07d}.csv")
    client.set_terminated(run)
    return run


def least_tracking(trials: int) -> dict[str, float]:
    """Part 2 (the module docstring): machine CPU seconds per trial of MLflow and of Optuna."""
    import optuna
    from mlflow import MlflowClient

    with services_env("eqlv2-floor-pg-") as env:
        run_head_services(env, "start", "all", timeout=600)
        os.environ["PGPASSWORD"] = env["PGPASSWORD"]
        client = MlflowClient(mlflow_uri(env))
        experiment_id = client.create_experiment("scale-floor")
        parent = client.create_run(experiment_id).info.run_id
        table = "category,name,group,train_count,pos_grad,neg_grad,ratio\n" + "".join(
            f"{i},c{i},r,{i},1,2,0.5\n" for i in range(12)
        )
        least_mlflow_trial(client, experiment_id, parent, table)  # warm
        cpu = machine_cpu_seconds()
        for _ in range(trials):
            least_mlflow_trial(client, experiment_id, parent, table)
        mlflow_cpu = (machine_cpu_seconds() - cpu) / trials
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2, multivariate=True)
        study = optuna.create_study(
            storage=database_url(env, "optuna"), direction="maximize", sampler=sampler
        )
        space = {
            "gamma": optuna.distributions.FloatDistribution(4, 16),
            "mu": optuna.distributions.FloatDistribution(0.5, 1.0),
        }
        cpu = machine_cpu_seconds()
        for _ in range(trials):
            trial = study.ask(space)
            for step in range(1, 4):
                trial.report(trial.params["gamma"] * step, step)
            study.tell(trial, trial.params["gamma"])
        optuna_cpu = (machine_cpu_seconds() - cpu) / trials
        run_head_services(env, "stop", "all", timeout=120)
    return {"mlflow_cpu_per_trial": mlflow_cpu, "optuna_cpu_per_trial": optuna_cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=500, help="trials of bare Ray Tune")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tracked", type=int, default=100, help="trials of the least tracking")
    args = parser.parse_args(argv)
    print(f"Bare Ray Tune: {args.trials} trials at concurrency {args.concurrency} ...", flush=True)
    bare = bare_tune(args.trials, args.concurrency)
    print(
        f"Least tracking: {args.tracked} trials against PostgreSQL-backed MLflow and Optuna ...",
        flush=True,
    )
    tracking = least_tracking(args.tracked)
    floor = (
        bare["cpu_per_trial"] + tracking["mlflow_cpu_per_trial"] + tracking["optuna_cpu_per_trial"]
    )
    print(
        f"bare Ray Tune:          {bare['trials_per_minute']:6.1f} trials/min, {bare['cpu_per_trial']:.2f} CPU-s/trial ({bare['errors']} errors)"
    )
    print(f"least MLflow tracking:  {tracking['mlflow_cpu_per_trial']:.2f} CPU-s/trial")
    print(f"least Optuna (PostgreSQL): {tracking['optuna_cpu_per_trial']:.2f} CPU-s/trial")
    cores = os.cpu_count() or 1
    print(
        f"floor:                  {floor:.2f} CPU-s/trial -> at most {cores * 60 / floor:.0f} trials/min on {cores} cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
