"""The search machinery at scale: many trials of a cheap stand-in, on the cluster's real stores.

Runs the search driver's own pipeline (``eqlv2/search/driver.py``: ``plan_search``,
``ray_cluster``, ``open_tracking``, ``trial_settings``, ``record_search``, ``build_tuner``,
``tuner.fit()``, ``report_outcome``) with one thing replaced: each trial's detectron2 training on
Ray Train is the stand-in of ``benchmarks/scale_standin.py`` (a documented function of
(gamma, mu, alpha) plus noise that reports a learning curve; ``alpha > 7`` diverges). Everything
else is real: Ray Tune, the Optuna searcher and its bookkeeping, ASHA, the trial's MLflow run
with its metric history and gradient-statistics tables, the driver's MLflow callback that writes
every trial run's final state, all against PostgreSQL (the Optuna study, MLflow's backend) and an
MLflow tracking server. The servers are started here as the tests start them
(``configs/cluster/head_services.sh`` on free 127.0.0.1 ports, removed afterwards), unless
``--mlflow-uri`` and ``--optuna-storage`` name running ones (``PGPASSWORD`` in the environment).

It prints trials per minute (wall time of ``tuner.fit()``), the driver's overhead per trial, the
rows written to MLflow and Optuna against the rows expected (nothing lost, nothing doubled), and
the Optuna and MLflow states against Tune's. Exit status 1 when anything is lost, doubled or in
the wrong state.

**Driver overhead per trial** = CPU time of the driver process (all its threads: Tune's
controller, the searcher's Optuna calls, the scheduler, the MLflow callback, Ray's client
threads) during ``tuner.fit()``, minus this script's own progress thread, divided by the trials.
CPU time, not wall time: on 2 shared cores the driver's wall time mostly waits for the trials and
the servers, while its CPU time is what it takes away from them. Also shown for the first and the
last fifth of the trials, to tell whether it grows with the number of trials.

**Machine CPU per trial** = CPU time of every process of the machine during ``tuner.fit()``
(``/proc/stat``: the trial processes, the stand-in workers, Ray, PostgreSQL, the MLflow server,
the driver, and any other work on the machine: read it with the load average) divided by the
trials.

The stand-in's training loop runs in a worker forked from ``scale_worker.py``'s server (the
trial process stays as light as a search's); ``--in-process`` runs it in the trial process,
which then imports torch and detectron2 (the benchmark's layout before the server), and
``--compare`` runs both, one after the other on the same servers, and prints them side by side.

Usage: ``python benchmarks/search_scale.py [--trials 500] [--concurrency 32] [--compare] [--json out.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local_services import database_url, mlflow_uri, run_head_services, services_env

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(ROOT))  # this checkout's eqlv2 (not an installed one), as tune/search.py
TARGET_TRIALS_PER_MINUTE = 60.0
TARGET_OVERHEAD_S = 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sampler", default="tpe", help="tpe (the search's default) or random")
    parser.add_argument("--iterations", type=int, default=200, help="stand-in iterations per trial")
    parser.add_argument(
        "--eval-period", type=int, default=50, help="iterations between evaluations"
    )
    parser.add_argument("--log-period", type=int, default=20, help="iterations between metric logs")
    parser.add_argument(
        "--step-seconds", type=float, default=0.5, help="stand-in sleep per log period"
    )
    parser.add_argument("--mlflow-uri", help="a running MLflow server (else one is started here)")
    parser.add_argument(
        "--optuna-storage", help="a running database URL (else PostgreSQL is started here)"
    )
    parser.add_argument(
        "--results-dir", help="Tune folder, outbox, reports (default: a temporary folder)"
    )
    parser.add_argument(
        "--profile", help="write a cProfile of the driver's tuner.fit() to this file"
    )
    parser.add_argument(
        "--profile-trials", help="a folder: each trial writes a cProfile of its run_trial there "
        "(CPU time of the trial's thread), and each forked stand-in worker one of its training "
        "loop (a worker killed by its stopped trial writes none); read them together with pstats",
    )  # fmt: skip
    parser.add_argument(
        "--in-process", action="store_true",
        help="run the stand-in's training loop in the trial process (it then imports torch and "
        "detectron2, as before the worker server), not in a forked worker",
    )  # fmt: skip
    parser.add_argument(
        "--compare", action="store_true",
        help="run the search twice on the same servers, the stand-in in a forked worker then in "
        "the trial process, and print both side by side",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if bool(args.mlflow_uri) != bool(args.optuna_storage):
        parser.error("give both --mlflow-uri and --optuna-storage, or neither")
    return args


# --- servers --------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_servers() -> Iterator[tuple[str, str]]:
    """PostgreSQL and an MLflow server on free 127.0.0.1 ports, as ``tests/pg_fixtures.py`` starts
    them (``benchmarks/local_services.py``); yields ``(tracking URI, Optuna URL)`` with
    ``PGPASSWORD`` set in this environment."""
    with services_env("eqlv2-scale-pg-") as env:
        print(f"Starting PostgreSQL and MLflow in {env['EQLV2_SERVICES_DIR']} ...", flush=True)
        run_head_services(env, "start", "all", timeout=600)
        os.environ["PGPASSWORD"] = env["PGPASSWORD"]  # libpq of this process and of Ray's workers
        yield mlflow_uri(env), database_url(env, "optuna")


# --- progress and the driver's CPU time -----------------------------------------------------------


@dataclass
class DriverMonitor:
    """A thread that samples the driver's CPU time and the finished trials (from the Optuna
    study), and prints progress. Its own CPU time is left out of the driver's."""

    optuna_url: str
    study_name: str
    trials: int
    period: float = 10.0
    samples: list[tuple[float, float, int]] = field(default_factory=list)
    own_cpu: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _counts(self, engine) -> dict[str, int]:
        from sqlalchemy import text

        query = text(
            "SELECT t.state, COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "WHERE s.study_name = :name GROUP BY t.state"
        )
        with engine.connect() as connection:
            return {
                str(state).split(".")[-1]: int(n)
                for state, n in connection.execute(query, {"name": self.study_name})
            }

    def _sample(self, engine, start: float) -> None:
        before = time.thread_time()
        counts = self._counts(engine)
        finished = sum(counts.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL"))
        self.own_cpu += time.thread_time() - before
        elapsed = time.monotonic() - start
        cpu = time.process_time() - self.own_cpu
        self.samples.append((elapsed, cpu, finished))
        rate = finished / elapsed * 60 if elapsed > 0 else 0.0
        per_trial = (cpu - self.samples[0][1]) / finished if finished else float("nan")
        line = ", ".join(
            f"{s} {counts.get(s, 0)}" for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
        )
        print(f"[scale] {elapsed:6.0f} s  {finished}/{self.trials} finished ({line})  {rate:.1f} trials/min  "
              f"driver CPU {per_trial:.3f} s/trial", flush=True)  # fmt: skip

    def _loop(self) -> None:
        from sqlalchemy import create_engine

        engine = create_engine(self.optuna_url, pool_size=1)
        start = time.monotonic()
        self.samples.append((0.0, time.process_time(), 0))
        while not self._stop.wait(self.period):
            with contextlib.suppress(Exception):
                self._sample(engine, start)
        with contextlib.suppress(Exception):
            self._sample(engine, start)
        engine.dispose()

    @contextlib.contextmanager
    def running(self) -> Iterator[DriverMonitor]:
        thread = threading.Thread(target=self._loop, name="scale-monitor", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=60)

    def cpu_per_trial(self, low: float, high: float) -> float:
        """Driver CPU seconds per trial while the finished trials went from ``low`` to ``high``
        (fractions of the total; the nearest samples)."""
        first = next((s for s in self.samples if s[2] >= low * self.trials), self.samples[0])
        last = next((s for s in self.samples if s[2] >= high * self.trials), self.samples[-1])
        trials = last[2] - first[2]
        return (last[1] - first[1]) / trials if trials > 0 else float("nan")


# --- the search -----------------------------------------------------------------------------------


@dataclass
class SearchRun:
    """What the benchmark's search produced: the driver's plan, settings and tracking, Tune's
    results, and the timings."""

    plan: Any
    settings: Any
    tracking: Any
    results: list
    fit_seconds: float
    driver_cpu: float
    outcome_seconds: float
    monitor: DriverMonitor
    machine_cpu: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)


def machine_cpu_seconds() -> float:
    """CPU seconds every process of the machine has used since boot (``/proc/stat``). Niced time
    included: Ray runs its workers, the trial processes among them, at niceness 15."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _prepare_environment(args: argparse.Namespace, ray_tmp: str) -> None:
    """Ray's short temp folder; Ray's workers import the stand-in from ``benchmarks/``; the
    libraries set up as the search driver sets them (inherited by the stand-in worker server)."""
    os.environ["RAY_TMPDIR"] = ray_tmp
    paths = [
        str(BENCHMARKS),
        str(ROOT),
        *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
    ]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    from scale_standin import PROFILE_DIR_ENV, STEP_SECONDS_ENV

    from eqlv2.search import driver

    driver._configure_libraries()

    os.environ[STEP_SECONDS_ENV] = str(args.step_seconds)
    if args.profile_trials:
        os.makedirs(args.profile_trials, exist_ok=True)
        os.environ[PROFILE_DIR_ENV] = os.path.abspath(args.profile_trials)


@contextlib.contextmanager
def standin_workers(in_process: bool, folder: str) -> Iterator[None]:
    """The stand-in worker server (``scale_worker.py``), unless the loop runs in the trial process."""
    if in_process:
        yield
        return
    from scale_worker import worker_server

    with worker_server(folder):
        yield


def _options(args: argparse.Namespace, mlflow_uri: str, optuna_url: str, results_dir: Path):
    from eqlv2.search.options import SearchOptions

    name = "scale_" + time.strftime("%Y%m%d_%H%M%S") + f"_{secrets.token_hex(2)}"
    schedule = ("SOLVER.MAX_ITER", str(args.iterations), "TEST.EVAL_PERIOD", str(args.eval_period))
    return SearchOptions(
        datasets=("lvis",), opts=(*schedule, "MODEL.EQLV2.LOG_PERIOD", str(args.log_period)),
        num_trials=args.trials, concurrency=args.concurrency, scheduler="asha", sampler=args.sampler,
        results_dir=str(results_dir), name=name, study_name=name, mlflow_uri=mlflow_uri,
        mlflow_experiment="eqlv2-search-scale", optuna_storage=optuna_url, baseline="none", noise_seeds=0,
        argv=("benchmarks/search_scale.py", *sys.argv[1:]),
    )  # fmt: skip


def _fit(tuner, monitor: DriverMonitor, profile: str | None) -> tuple[list, float, float, float]:
    """``tuner.fit()`` (under cProfile if asked): its results, wall time, the driver's CPU time
    and the machine's (every process)."""
    profiler = cProfile.Profile() if profile else None
    with monitor.running():
        cpu, start, machine = time.process_time(), time.monotonic(), machine_cpu_seconds()
        if profiler:
            profiler.enable()
        results = list(tuner.fit())
        if profiler:
            profiler.disable()
        wall, cpu = time.monotonic() - start, time.process_time() - cpu
        machine = machine_cpu_seconds() - machine
    if profiler:
        profiler.dump_stats(profile)
    return results, wall, cpu - monitor.own_cpu, machine


def run_search(
    args: argparse.Namespace, mlflow_uri: str, optuna_url: str, results_dir: Path
) -> SearchRun:
    """The driver's pipeline with the stand-in trial (the module docstring)."""
    from scale_standin import standin_trial

    from eqlv2.search import driver

    driver._configure_libraries()  # what run_search sets first
    plan = driver.plan_search(_options(args, mlflow_uri, optuna_url, results_dir))
    # In place of prepare_datasets (which builds detectron2 configs and data): the schedule.
    plan.settings.schedules.update({spec.name: (args.iterations, args.eval_period) for spec in plan.settings.datasets})
    with driver.ray_cluster(plan.options, plan.env):
        tracking = driver.open_tracking(plan)
        if tracking is None:
            raise SystemExit(f"MLflow at {plan.tracking_uri} is unreachable")
        settings = driver.trial_settings(plan, tracking)
        driver.record_search(plan, settings, tracking)
        tuner = driver.build_tuner(plan, settings, tracking, trial_function=standin_trial)
        monitor = DriverMonitor(plan.settings.optuna_storage, plan.settings.study_name, args.trials)
        print(
            f"Search {plan.settings.search_name}: {args.trials} stand-in trials, concurrency {args.concurrency}",
            flush=True,
        )
        load_before = os.getloadavg()[0]
        results, wall, cpu, machine = _fit(tuner, monitor, args.profile)
        load = (load_before, os.getloadavg()[0])
        start = time.monotonic()
        (results_dir / "summary.txt").write_text(driver.report_outcome(plan, settings, tracking, results).summary + "\n")
        outcome = time.monotonic() - start
    return SearchRun(plan, settings, tracking, results, wall, cpu, outcome, monitor, machine, load)


# --- what was written, against what should have been ---------------------------------------------

#: Tune's view of a trial's end → the Optuna state and the MLflow run status it must have.
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


@dataclass(frozen=True)
class TuneTrial:
    """How a trial ended in Tune: its Optuna number, Tune id, state (COMPLETE: reported the
    completion marker, PRUNED: stopped without it, FAIL: errored), last evaluation step and
    last iteration seen by Tune."""

    number: int
    trial_id: str
    state: str
    evals: int
    iteration: int


@dataclass
class Count:
    """One line of the table: rows expected (a minimum for trials stopped early), found, lost, doubled."""

    what: str
    expected: int = 0
    found: int = 0
    lost: int = 0
    doubled: int = 0


def _tune_state(result, completion_key: str) -> str:
    """FAIL (errored), COMPLETE (reported the completion marker) or PRUNED (stopped without it)."""
    if result.error is not None:
        return "FAIL"
    return "COMPLETE" if result.metrics.get(completion_key) else "PRUNED"


def tune_trials(results: list) -> list[TuneTrial]:
    """Tune's view of every trial that reported, from ``tuner.fit()``'s results (a trial that
    never started or never reported, after an interrupt, is left out: the run then fails)."""
    from eqlv2.search.optuna_study import COMPLETION_KEY, STEP_KEY, TRIAL_NUMBER_KEY

    trials = []
    for result in results:
        if result.config is None or not result.metrics:
            continue
        metrics = result.metrics
        iteration = int(metrics.get("lvis/iteration", metrics.get("iteration", 0)) or 0)
        number, trial_id = int(result.config[TRIAL_NUMBER_KEY]), str(metrics.get("trial_id", ""))
        state, evals = _tune_state(result, COMPLETION_KEY), int(metrics.get(STEP_KEY, 0) or 0)
        trials.append(TuneTrial(number, trial_id, state, evals, iteration))
    return trials


def _prefix_check(
    count: Count, found: list[int], schedule: list[int], required: int, complete: bool
) -> None:
    """Adds one trial's rows: ``found`` must hold the first ``required`` steps of ``schedule``
    (all of them when ``complete``), each once, without gaps; a trial stopped early may add one
    point off the schedule at its last step (detectron2's writers flush when training stops)."""
    need = len(schedule) if complete else required
    count.expected += need
    count.found += len(found)
    distinct = sorted(set(found))
    off_schedule = [step for step in distinct if step not in schedule]
    allowed = 1 if not complete and off_schedule == distinct[-1:] else 0
    count.doubled += len(found) - len(distinct) + len(off_schedule) - allowed
    on_schedule = [step for step in distinct if step in schedule]
    longest = max(need, len(on_schedule))
    count.lost += sum(1 for step in schedule[:longest] if step not in on_schedule)


def audit_optuna(run: SearchRun, trials: list[TuneTrial]) -> tuple[list[Count], dict[int, str]]:
    """Optuna's trials and intermediate values against Tune's trials; Optuna's state by number."""
    import optuna

    study = optuna.load_study(study_name=run.plan.settings.study_name, storage=run.plan.settings.optuna_storage)
    stored = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows, values = Count("Optuna trials"), Count("Optuna intermediate values")
    rows.expected, rows.found = len(trials), len(stored)
    known = {t.number for t in trials}
    rows.lost = len(known - set(stored))
    rows.doubled = len(set(stored) - known) + len(trials) - len(known)
    for trial in trials:
        if trial.number in stored:
            steps = sorted(stored[trial.number].intermediate_values)
            _prefix_check(values, steps, list(range(1, trial.evals + 1)), trial.evals, True)
    return [rows, values], {n: t.state.name for n, t in stored.items()}


def _mlflow_children(run: SearchRun) -> list:
    """The child runs of the search's parent run."""
    from mlflow import MlflowClient

    client, runs, token = MlflowClient(run.tracking.tracking_uri), [], None
    query = f"tags.mlflow.parentRunId = '{run.tracking.parent_run_id}'"
    while True:
        page = client.search_runs(
            [run.tracking.experiment_id], query, max_results=1000, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _run_rows(tracking_uri: str, run_id: str) -> tuple[list[int], list[int], list[int]]:
    """Steps of ``lvis/total_loss`` and of ``objective``, and the gradient tables' iterations, of one run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    losses = [m.step for m in client.get_metric_history(run_id, "lvis/total_loss")]
    objectives = [m.step for m in client.get_metric_history(run_id, "objective")]
    files = [Path(f.path).name for f in client.list_artifacts(run_id, "gradient_statistics/lvis")]
    tables = [
        int(name[5:12]) for name in files if name.startswith("iter_") and name.endswith(".csv")
    ]
    return losses, objectives, tables


def audit_mlflow(
    run: SearchRun, trials: list[TuneTrial], args: argparse.Namespace
) -> tuple[list[Count], dict[int, str]]:
    """The trial runs, their metric history, the driver's objective and the gradient tables
    against Tune's trials; each run's status by Optuna number."""
    from concurrent.futures import ThreadPoolExecutor

    children = _mlflow_children(run)
    by_trial: dict[str, list] = {}
    for child in children:
        by_trial.setdefault(child.data.tags.get("tune_trial_id", ""), []).append(child)
    runs, losses, objectives, tables = (Count(w) for w in ("MLflow trial runs", "MLflow metric points (lvis/total_loss)",
                                                           "MLflow objective points (driver)", "MLflow gradient tables"))  # fmt: skip
    runs.expected, runs.found = len(trials), len(children)
    runs.lost = sum(1 for t in trials if t.trial_id not in by_trial)
    runs.doubled = len(children) - sum(1 for t in trials if t.trial_id in by_trial)
    matched = [(t, by_trial[t.trial_id][0]) for t in trials if t.trial_id in by_trial]
    with ThreadPoolExecutor(8) as pool:
        rows = list(
            pool.map(
                lambda pair: _run_rows(run.tracking.tracking_uri, pair[1].info.run_id), matched
            )
        )
    log_steps = [s for s in range(args.log_period, args.iterations + 1, args.log_period)]
    log_steps += [args.iterations] if args.iterations % args.log_period else []
    eval_steps = list(range(args.eval_period, args.iterations + 1, args.eval_period))
    for (trial, _), (loss_steps, objective_steps, table_steps) in zip(matched, rows, strict=True):
        complete = trial.state == "COMPLETE"
        _prefix_check(
            losses, loss_steps, log_steps, sum(s <= trial.iteration for s in log_steps), complete
        )
        _prefix_check(tables, table_steps, eval_steps, trial.evals, complete)
        objectives.expected += 1
        objectives.found += len(objective_steps)
        objectives.lost += not objective_steps
        objectives.doubled += max(0, len(objective_steps) - 1)
    statuses = {
        t.number: by_trial[t.trial_id][0].info.status for t in trials if t.trial_id in by_trial
    }
    return [runs, losses, objectives, tables], statuses


def state_table(
    trials: list[TuneTrial], optuna_states: dict[int, str], mlflow_statuses: dict[int, str]
) -> tuple[list[str], int]:
    """Lines of trial states by store, and how many trials have another state than Tune's."""
    lines, mismatches = [], 0
    for trial in trials:
        if (
            optuna_states.get(trial.number) != trial.state
            or mlflow_statuses.get(trial.number) != MLFLOW_STATUS[trial.state]
        ):
            mismatches += 1
    for store, states in (("Tune", [t.state for t in trials]), ("Optuna", list(optuna_states.values())),
                          ("MLflow", list(mlflow_statuses.values()))):  # fmt: skip
        counted = {s: states.count(s) for s in sorted(set(states))}
        lines.append(f"  {store:<8}" + "  ".join(f"{s} {n}" for s, n in counted.items()))
    return lines, mismatches


# --- the report -----------------------------------------------------------------------------------


def figures(run: SearchRun, trials: list[TuneTrial]) -> dict[str, Any]:
    """Throughput and the driver's overhead (the module docstring)."""
    from scale_standin import IN_PROCESS_ENV

    count = max(1, len(trials))
    return {
        "trials": len(trials),
        "fit_seconds": run.fit_seconds,
        "trials_per_minute": len(trials) / run.fit_seconds * 60,
        "driver_cpu_per_trial": run.driver_cpu / count,
        "driver_cpu_per_trial_first_fifth": run.monitor.cpu_per_trial(0.0, 0.2),
        "driver_cpu_per_trial_last_fifth": run.monitor.cpu_per_trial(0.8, 1.0),
        "report_outcome_seconds": run.outcome_seconds,
        "machine_cpu_per_trial": run.machine_cpu / count,
        "load_average_start": run.load[0],
        "load_average_end": run.load[1],
        "layout": "in-process" if os.environ.get(IN_PROCESS_ENV) == "1" else "forked",
    }


def print_report(
    values: dict[str, float], counts: list[Count], states: list[str], mismatches: int, args
) -> None:
    """The figures as a short table."""
    rate, overhead = values["trials_per_minute"], values["driver_cpu_per_trial"]
    print(f"\nSearch scale: {values['trials']} stand-in trials ({values['layout']}), concurrency {args.concurrency}, sampler {args.sampler}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")  # fmt: skip
    print(f"  {'trials per minute (tuner.fit wall time)':<48}{rate:10.1f}   goal >= {TARGET_TRIALS_PER_MINUTE:g}"
          f"  {'ok' if rate >= TARGET_TRIALS_PER_MINUTE else 'MISSED'}")  # fmt: skip
    print(f"  {'driver CPU per trial (s)':<48}{overhead:10.3f}   goal < {TARGET_OVERHEAD_S:g}"
          f"  {'ok' if overhead < TARGET_OVERHEAD_S else 'MISSED'}")  # fmt: skip
    print(f"  {'  first fifth of the trials / last fifth (s)':<48}{values['driver_cpu_per_trial_first_fifth']:10.3f} / "
          f"{values['driver_cpu_per_trial_last_fifth']:.3f}")  # fmt: skip
    print(f"  {'tuner.fit wall time (s)':<48}{values['fit_seconds']:10.1f}")
    print(f"  {'machine CPU per trial (s, every process)':<48}{values['machine_cpu_per_trial']:10.2f}")
    print(f"  {'load average (1 min) at start / end of fit':<48}{values['load_average_start']:10.1f} / "
          f"{values['load_average_end']:.1f}")  # fmt: skip
    print(f"  {'report_outcome after fit (s)':<48}{values['report_outcome_seconds']:10.1f}\n")
    print(f"  {'rows':<42}{'expected':>9}{'found':>9}{'lost':>7}{'doubled':>9}")
    for count in counts:
        print(
            f"  {count.what:<42}{count.expected:>9}{count.found:>9}{count.lost:>7}{count.doubled:>9}"
        )
    print("  (expected: every row of a completed trial, and for a trial stopped early or failed the rows up to\n"
          "   the last result Tune received from it)\n")  # fmt: skip
    print("States (Optuna COMPLETE/PRUNED/FAIL = MLflow FINISHED/KILLED/FAILED = Tune's):")
    print("\n".join(states))
    print(f"  trials whose Optuna or MLflow state differs from Tune's: {mismatches}")


def benchmark(args: argparse.Namespace, mlflow_uri: str, optuna_url: str, results_dir: Path) -> tuple[int, dict]:
    """Runs the search, checks the stores, prints the table; the exit status and the figures."""
    run = run_search(args, mlflow_uri, optuna_url, results_dir)
    trials = tune_trials(run.results)
    optuna_counts, optuna_states = audit_optuna(run, trials)
    mlflow_counts, mlflow_statuses = audit_mlflow(run, trials, args)
    counts = optuna_counts + mlflow_counts
    states, mismatches = state_table(trials, optuna_states, mlflow_statuses)
    values = figures(run, trials)
    print_report(values, counts, states, mismatches, args)
    data = {**values, "counts": [vars(c) for c in counts], "state_mismatches": mismatches,
            "states": {t.number: t.state for t in trials}, "search": run.plan.settings.search_name}  # fmt: skip
    bad = sum(c.lost + c.doubled for c in counts) + mismatches + (len(trials) != args.trials)
    print(
        "\nNothing lost, nothing doubled, every state as Tune's."
        if not bad
        else f"\nFAILED: {bad} problem(s) above."
    )
    return (0 if not bad else 1), data


def _comparison(runs: list[dict]) -> str:
    """The figures of the runs of ``--compare``, a line each."""
    lines = ["layout        trials/min  driver CPU/trial (s)  first/last fifth (s)  machine CPU/trial (s)  lost  doubled  "
             "state mismatches  load average start/end"]  # fmt: skip
    for v in runs:
        lost, doubled = (sum(c[k] for c in v["counts"]) for k in ("lost", "doubled"))
        lines.append(
            f"{v['layout']:<12}{v['trials_per_minute']:12.1f}{v['driver_cpu_per_trial']:22.3f}"
            f"{v['driver_cpu_per_trial_first_fifth']:14.3f} / {v['driver_cpu_per_trial_last_fifth']:.3f}"
            f"{v['machine_cpu_per_trial']:19.2f}{lost:8d}{doubled:9d}{v['state_mismatches']:18d}"
            f"{v['load_average_start']:14.1f} / {v['load_average_end']:.1f}"
        )
    return "\n".join(lines)


def run_layouts(args: argparse.Namespace, mlflow_uri: str, optuna_url: str, results_dir: Path, ray_tmp: str) -> int:
    """The benchmark in the layout asked, or with ``--compare`` in both, one after the other."""
    from scale_standin import IN_PROCESS_ENV

    layouts = [False, True] if args.compare else [args.in_process]
    status, runs = 0, []
    for in_process in layouts:
        os.environ[IN_PROCESS_ENV] = "1" if in_process else "0"
        with standin_workers(in_process, ray_tmp):
            code, data = benchmark(args, mlflow_uri, optuna_url, results_dir / ("in_process" if in_process else "forked"))
        status, runs = max(status, code), [*runs, data]
    if args.compare:
        print("\nSide by side (the same servers, one after the other):\n" + _comparison(runs))
    if args.json:
        Path(args.json).write_text(json.dumps(runs if args.compare else runs[0], indent=2))
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    results_dir = Path(args.results_dir or tempfile.mkdtemp(prefix="eqlv2-scale-")).resolve()
    _prepare_environment(args, ray_tmp)
    try:
        if args.mlflow_uri:
            return run_layouts(args, args.mlflow_uri, args.optuna_storage, results_dir, ray_tmp)
        with local_servers() as (mlflow_uri, optuna_url):
            return run_layouts(args, mlflow_uri, optuna_url, results_dir, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if not args.results_dir:
            shutil.rmtree(results_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
