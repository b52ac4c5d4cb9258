"""The search driver: Ray Tune + Optuna over EQL v2's hyper-parameters, tracked in MLflow.

:func:`run_search` is what ``tune/search.py`` runs. In order, it

1. resolves every location to an absolute path (results folder, Tune storage, SQLite databases,
   dataset roots) so that Ray workers, whatever their working directory, agree;
2. builds each dataset's config once (failing early on a bad config or override) and generates the
   offline benchmark before any trial starts;
3. creates the MLflow database and the parent run, and opens (or continues) the Optuna study;
4. starts or resumes the Tune experiment: ``TrialStateOptunaSearch`` behind a
   ``ConcurrencyLimiter``, ASHA on the intermediate objective, the trainable
   :func:`eqlv2.search.trial.run_trial` with no CPU of its own (its Ray Train workers take them);
5. prints and logs the ranked table, the best configuration and Optuna's plots.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["SMOKE_OVERRIDES", "SearchOptions", "SearchOutcome", "run_search"]

#: Overrides of ``--smoke``: the smallest real search (a few iterations, small images, two
#: evaluations per run so that ASHA has an intermediate result to act on).
SMOKE_OVERRIDES: tuple[str, ...] = (
    "SOLVER.MAX_ITER", "12",
    "SOLVER.STEPS", "(10,)",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.CHECKPOINT_PERIOD", "100000",
    "TEST.EVAL_PERIOD", "6",
    "TEST.DETECTIONS_PER_IMAGE", "10",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "160",
    "MODEL.EQLV2.LOG_PERIOD", "6",
)  # fmt: skip

STATE_FILE = "eqlv2_search.json"
#: Custom resource a Ray cluster started here offers for the trials' driver functions: a trial
#: takes one, no CPU, so its Ray Train workers can have every core (Ray's advice for Tune + Train).
TRIAL_RESOURCE = "eqlv2_trial"
LATEST_FILE = "latest_search.json"


@dataclass
class SearchOptions:
    """The command line of ``tune/search.py`` (see its ``--help``)."""

    search_space: str = "configs/search/default.yaml"
    datasets: tuple[str, ...] = ("lvis",)
    config_files: tuple[str, ...] = ()
    opts: tuple[str, ...] = ()
    num_trials: int = 4
    concurrency: int = 1
    workers_per_trial: int | None = None
    cpus_per_worker: int = 1
    use_gpu: bool = False
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    sampler: str = "tpe"
    metric: str = "AP"
    multi_objective: bool = False
    results_dir: str = "eqlv2_runs"
    storage_path: str | None = None
    name: str | None = None
    mlflow_uri: str | None = None
    mlflow_experiment: str = "eqlv2-search"
    optuna_storage: str | None = None
    study_name: str | None = None
    resume: bool = False
    smoke: bool = False
    seed: int = 42
    max_failures: int = 0
    ray_address: str | None = None
    num_cpus: int | None = None
    baseline_gradients: tuple[str, ...] = ()
    verbose: bool = False
    argv: tuple[str, ...] = ()


@dataclass
class SearchOutcome:
    """What a search produced.

    Attributes:
        name: Tune experiment name.
        experiment_path: the Tune experiment folder.
        table: the ranked table as printed.
        best: the best trial record (None if no trial completed).
        records: every trial.
        tracking_uri, parent_run_id, experiment_id: MLflow (None if not tracked).
        optuna_storage, study_name: the study.
        report_paths: CSV / Markdown / JSON reports.
    """

    name: str
    experiment_path: str
    table: str
    best: Any
    records: list = field(default_factory=list)
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    experiment_id: str | None = None
    optuna_storage: str | None = None
    study_name: str | None = None
    report_paths: dict = field(default_factory=dict)


# --- preparation ----------------------------------------------------------------------------------


def _absolute(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _pin_dataset_roots() -> dict[str, str]:
    """Makes the dataset roots absolute in this process's environment (inherited by a local Ray
    cluster's workers); returns the variables set, for a remote cluster's runtime env."""
    from eqlv2.data import synthetic_root

    env = {}
    if not os.environ.get("EQLV2_SYNTHETIC_ROOT"):
        os.environ["EQLV2_SYNTHETIC_ROOT"] = str(synthetic_root())
    env["EQLV2_SYNTHETIC_ROOT"] = os.environ["EQLV2_SYNTHETIC_ROOT"]
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    os.environ["DETECTRON2_DATASETS"] = str(_absolute(root))
    env["DETECTRON2_DATASETS"] = os.environ["DETECTRON2_DATASETS"]
    return env


def _prepare_datasets(specs, opts: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Builds each config (errors surface now, not in a trial), generates the data the configs use,
    and returns each dataset's ``(SOLVER.MAX_ITER, TEST.EVAL_PERIOD)``."""
    from detectron2.data import DatasetCatalog

    from eqlv2.engine import setup_cfg
    from eqlv2.engine.base_checkpoint import ensure_base_checkpoint

    schedules = {}
    for spec in specs:
        cfg = setup_cfg(spec.config_file, list(opts))
        for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
            start = time.perf_counter()
            count = len(DatasetCatalog.get(name))
            logger.info("Dataset %s: %d images (%.1f s)", name, count, time.perf_counter() - start)
        schedules[spec.name] = (int(cfg.SOLVER.MAX_ITER), int(cfg.TEST.EVAL_PERIOD))
        ensure_base_checkpoint(cfg)  # the config's base checkpoint, trained once before any trial
    return schedules


def _study_name(options: SearchOptions, space_file: str, objective) -> str:
    if options.study_name:
        return options.study_name
    stem = Path(space_file).stem
    kind = "mo" if options.multi_objective else objective.slug
    suffix = "_smoke" if options.smoke else ""
    return f"eqlv2_{'+'.join(options.datasets)}_{kind}_{stem}{suffix}"


def _workers_per_trial(options: SearchOptions, cluster: dict[str, float]) -> int:
    if options.workers_per_trial:
        return options.workers_per_trial
    cpus = int(cluster.get("CPU", 1))
    per_trial = max(1, cpus // max(1, options.concurrency))
    workers = max(1, min(2, per_trial // max(1, options.cpus_per_worker)))
    if options.use_gpu:
        workers = max(1, min(workers, int(cluster.get("GPU", 1)) // max(1, options.concurrency)))
    return workers


def _absolute_sqlite(uri: str | None) -> str | None:
    """``sqlite:///relative.db`` made absolute: Ray workers run in other folders."""
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{_absolute(uri[len('sqlite:///'):])}"
    return uri


def _space_path(value: str) -> Path:
    """The search-space file: as given, else relative to the repository (``configs/search/...``
    works from any directory)."""
    from .settings import repository_root

    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and (repository_root() / path).exists():
        path = repository_root() / path
    return path.resolve()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --- MLflow ---------------------------------------------------------------------------------------


def _start_tracking(options, uri, artifact_root, name, state, parent_params, space_file):
    """Creates the store and the parent run (or reopens it on resume). Returns
    ``(experiment_id, parent_run_id, mlflow)``; ``(None, None, None)`` when MLflow is unreachable."""
    from .mlflow_tracking import (
        SEARCH_TAG,
        SafeMlflow,
        close_stale_child_runs,
        prepare_tracking_store,
    )

    try:
        experiment_id = prepare_tracking_store(uri, options.mlflow_experiment, artifact_root)
    except Exception as error:
        logger.warning(
            "MLflow tracking store %s is unreachable (%s: %s): this search is NOT tracked in MLflow; "
            "results stay in the Tune folder and the Optuna study.",
            uri,
            type(error).__name__,
            str(error).splitlines()[0][:300] if str(error) else "",
        )
        return None, None, None
    mlflow = SafeMlflow(uri)
    parent = state.get("parent_run_id")
    if parent:
        mlflow.call("reopening the parent run", lambda c: c.update_run(parent, status="RUNNING"))
        close_stale_child_runs(mlflow, experiment_id, parent, "interrupted")
        return experiment_id, parent, mlflow
    parent = mlflow.create_run(experiment_id, name, {SEARCH_TAG: name, "kind": "search"})
    mlflow.log_params(parent, parent_params)
    if parent:
        mlflow.log_artifact(parent, space_file)
        mlflow.log_text(parent, shlex.join(["python", "tune/search.py", *options.argv]) + "\n", "command.txt")
    return experiment_id, parent, mlflow


def _finish_tracking(mlflow, parent, records, settings, study, paths, table, best_text, experiment_id) -> None:
    from .mlflow_tracking import close_stale_child_runs
    from .plots import plot_optuna_history, plot_optuna_importance

    if mlflow is None or parent is None:
        return
    interrupted = any(r.status == "running" for r in records)
    if interrupted:
        # Trials cut short by an interrupted driver: closed now, reopened as new runs on --resume.
        close_stale_child_runs(mlflow, experiment_id, parent, "interrupted")
    for path in paths.values():
        mlflow.log_artifact(parent, path)
    mlflow.log_text(parent, table + "\n\n" + best_text + "\n", "summary.txt")
    counts = {"trials_" + s: sum(r.status == s for r in records) for s in ("complete", "pruned", "failed")}
    from .report import best_record

    best = best_record(records)
    metrics: dict[str, Any] = dict(counts)
    if best is not None:
        metrics["best_objective"] = best.objective
        for key, value in best.metrics.items():
            if isinstance(value, int | float) and "/" in key and not key.endswith("checkpoint_path"):
                if any(key.endswith("/" + m) for spec in settings.datasets for m in spec.metrics):
                    metrics["best/" + key] = value
        mlflow.set_tags(parent, {"best_trial": best.trial_id, **{f"best_{k}": v for k, v in best.params.items()}})
    mlflow.log_metrics(parent, metrics, step=0)
    if study is not None:
        with tempfile.TemporaryDirectory() as tmp:
            for make, file in ((plot_optuna_importance, "optuna_param_importance.png"), (plot_optuna_history, "optuna_history.png")):
                try:
                    path = make(study, Path(tmp) / file, target_name=settings.objective.text)
                except Exception as error:
                    logger.warning("Could not draw %s: %s", file, error)
                    path = None
                if path is not None:
                    mlflow.log_artifact(parent, path, "optuna")
    mlflow.set_tags(parent, {"search_status": "interrupted" if interrupted else "finished"})
    mlflow.terminate(parent, "KILLED" if interrupted else "FINISHED")
    mlflow.warn_dropped("search driver")


# --- the search -----------------------------------------------------------------------------------


def _resolve(options: SearchOptions) -> dict[str, Any]:
    """Absolute locations and the experiment name (the latest one on ``--resume``)."""
    results_dir = _absolute(options.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    storage_path = _absolute(options.storage_path) if options.storage_path else results_dir / "ray_results"
    storage_path.mkdir(parents=True, exist_ok=True)
    name = options.name
    if options.resume and not name:
        name = _read_json(storage_path / LATEST_FILE).get("name")
        if not name:
            raise SystemExit(f"--resume: no search to resume in {storage_path} (give --name)")
    if not name:
        name = "eqlv2_search_" + time.strftime("%Y%m%d_%H%M%S")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise SystemExit(f"--name {name!r}: use letters, digits and _ . + - only")
    experiment_path = storage_path / name
    if experiment_path.exists() and not options.resume:
        raise SystemExit(f"experiment {experiment_path} exists: add --resume to continue it, or give another --name")
    return {"results_dir": results_dir, "storage_path": storage_path, "name": name, "experiment_path": experiment_path}


def run_search(options: SearchOptions) -> SearchOutcome:
    """Runs (or resumes) a search; returns its outcome. See the module docstring.

    Raises:
        SystemExit: a bad option, with a message naming it.
    """
    import optuna
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .mlflow_tracking import (
        TrialRunsCallback,
        default_tracking_uri,
        read_gradient_ratio,
        ui_command,
    )
    from .optuna_bookkeeping import (
        STEP_KEY,
        TrialStateOptunaSearch,
        build_sampler,
        fail_orphaned_trials,
        open_storage,
        pending_seed_points,
        storage_url,
    )
    from .placement_groups import PlacementGroupJanitor
    from .report import (
        best_config_text,
        best_record,
        format_table,
        records_from_results,
        write_reports,
    )
    from .scheduling import build_scheduler
    from .settings import TrialSettings, dataset_specs, parse_objective
    from .space import load_search_space
    from .trial import run_trial

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter shows chosen columns
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # a killed driver loses ≤ 2 s of state
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

    where = _resolve(options)
    name, experiment_path = where["name"], where["experiment_path"]
    state = _read_json(experiment_path / STATE_FILE) if options.resume else {}

    space_file = _space_path(options.search_space)
    try:
        space = load_search_space(space_file)
        objective = parse_objective(options.metric)
        specs = dataset_specs(options.datasets, options.config_files)
        objective.check(specs)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(str(error)) from error
    if options.multi_objective and len(specs) < 2:
        raise SystemExit("--multi-objective needs at least two --datasets")
    # Later overrides win: the space file's trial budget, then --smoke's, then the command line's.
    opts = space.trial_overrides + tuple(SMOKE_OVERRIDES if options.smoke else ()) + tuple(options.opts)

    env = _pin_dataset_roots()
    logger.info("Building configs and generating the data they use (once)")
    try:
        schedules = _prepare_datasets(specs, opts)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"bad config or override: {error}") from error

    baselines = {}
    for entry in options.baseline_gradients:
        dataset, _, path = entry.partition("=")
        if not path:
            dataset, path = specs[0].name, entry
        baselines[dataset] = tuple(read_gradient_ratio(path))

    tracking_uri = state.get("tracking_uri") or _absolute_sqlite(options.mlflow_uri) or default_tracking_uri(
        where["results_dir"]
    )
    optuna_url = state.get("optuna_storage") or storage_url(
        _absolute_sqlite(options.optuna_storage), where["results_dir"] / "optuna.db"
    )
    study_name = state.get("study_name") or _study_name(options, space_file, objective)

    started_ray = False
    if not ray.is_initialized():
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": options.verbose}
        if options.ray_address:
            init.update(address=options.ray_address, runtime_env={"env_vars": env})
        else:
            init["address"] = "local"  # a new instance, never another user's running cluster
            init["num_cpus"] = options.num_cpus
            init["resources"] = {TRIAL_RESOURCE: 1000}
            init["configure_logging"] = True
            init["logging_level"] = logging.WARNING
        ray.init(**init)
        started_ray = True
    try:
        workers = _workers_per_trial(options, ray.cluster_resources())
        parent_params = {
            **{f"space/{k}": v for k, v in space.describe().items()},
            "search_space_file": str(space_file),
            "datasets": ",".join(s.name for s in specs),
            **{f"config/{s.name}": s.config_file for s in specs},
            "overrides": " ".join(opts) or "-",
            "metric": objective.text,
            "multi_objective": options.multi_objective,
            "num_trials": options.num_trials,
            "concurrency": options.concurrency,
            "workers_per_trial": workers,
            "use_gpu": options.use_gpu,
            "scheduler": options.scheduler,
            "sampler": options.sampler,
            "seed": options.seed,
            "optuna_storage": optuna_url,
            "study_name": study_name,
            "tune_storage": str(where["storage_path"]),
            "smoke": options.smoke,
        }
        experiment_id, parent_run_id, mlflow = _start_tracking(
            options, tracking_uri, where["results_dir"] / "mlartifacts", name, state, parent_params, str(space_file)
        )
        settings = TrialSettings(
            space=space,
            datasets=specs,
            objective=objective,
            opts=opts,
            multi_objective=options.multi_objective,
            num_workers=workers,
            use_gpu=options.use_gpu,
            cpus_per_worker=options.cpus_per_worker,
            max_failures=options.max_failures,
            seed=options.seed,
            tracking_uri=tracking_uri if experiment_id else None,
            experiment_id=experiment_id,
            parent_run_id=parent_run_id,
            search_name=name,
            optuna_storage=optuna_url,
            study_name=study_name,
            log_period=int(_opt_value(opts, "MODEL.EQLV2.LOG_PERIOD", 20)),
            baseline_ratios=baselines,
            schedules=schedules,
        )
        experiment_path.mkdir(parents=True, exist_ok=True)
        state = {
            "name": name,
            "tracking_uri": tracking_uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent_run_id,
            "optuna_storage": optuna_url,
            "study_name": study_name,
            "argv": list(options.argv),
            "options": asdict(options),
        }
        (experiment_path / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
        (where["storage_path"] / LATEST_FILE).write_text(json.dumps({"name": name}))

        if settings.multi_objective:
            metric: Any = settings.objective_keys()
            mode: Any = ["max"] * len(metric)
        else:
            metric, mode = "objective", "max"
        storage = open_storage(optuna_url)
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            load_if_exists=True,
            directions=["maximize"] * (len(metric) if isinstance(metric, list) else 1),
        )
        record_keys = ["objective", *settings.objective_keys(), STEP_KEY] + [
            f"{s.name}/{m}" for s in specs for m in s.metrics
        ]
        total_evals = sum(settings.evaluations(s.name) for s in specs)
        try:
            scheduler = build_scheduler(options.scheduler, total_evals, options.grace_period, options.reduction_factor)
        except ValueError as error:
            raise SystemExit(str(error)) from error
        trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings), _trial_resources())
        callbacks: list = [PlacementGroupJanitor()]
        if experiment_id and parent_run_id:
            callbacks.append(TrialRunsCallback(tracking_uri, experiment_id, parent_run_id))
        run_config = tune.RunConfig(
            name=name,
            storage_path=str(where["storage_path"]),
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            progress_reporter=_reporter(settings, space),
            verbose=1,
        )
        resumed = options.resume and tune.Tuner.can_restore(str(experiment_path))
        if resumed:
            logger.info("Resuming Tune experiment %s (study %r)", experiment_path, study_name)
            tuner = tune.Tuner.restore(
                str(experiment_path), trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
            )
        else:
            if options.resume:
                logger.warning("No Tune state in %s yet: starting the search there afresh", experiment_path)
                fail_orphaned_trials(study, name, set(), "asked by a search driver that was interrupted")
            seeds = pending_seed_points(study, space.seed_points)
            searcher = TrialStateOptunaSearch(
                space.optuna_distributions(),
                metric,
                mode,
                points_to_evaluate=seeds or None,
                sampler=build_sampler(options.sampler, options.seed, settings.multi_objective),
                study_name=study_name,
                storage=storage,
                experiment=name,
                record_keys=record_keys,
            )
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=ConcurrencyLimiter(searcher, max_concurrent=options.concurrency),
                    scheduler=scheduler,
                    num_samples=options.num_trials,
                ),
                run_config=run_config,
            )
        print(
            f"\nSearch {name}: {options.num_trials} trial(s) of {', '.join(s.name for s in specs)}, "
            f"{workers} Ray Train worker(s) per trial, concurrency {options.concurrency}, "
            f"{options.scheduler} scheduler, metric {objective.text}; study {study_name!r}\n",
            flush=True,
        )
        results = tuner.fit()

        study = optuna.load_study(study_name=study_name, storage=storage)
        records = records_from_results(list(results), settings, study)
        table = format_table(records, settings)
        best = best_record(records)
        best_text = best_config_text(best, settings)
        paths = write_reports(records, settings, experiment_path)
        if settings.multi_objective:
            front = sorted(r.trial_id for r in records if r.pareto)
            best_text += "\nPareto front (one objective per dataset): " + (", ".join(front) or "empty")
        _finish_tracking(mlflow, parent_run_id, records, settings, study, paths, table, best_text, experiment_id)
        if any(r.status == "running" for r in records):
            best_text += "\n\nThe search was interrupted: continue it with the same command and --resume."
        _print_summary(table, best_text, tracking_uri if experiment_id else None, optuna_url, study_name, experiment_path, ui_command)
        return SearchOutcome(
            name=name,
            experiment_path=str(experiment_path),
            table=table,
            best=best,
            records=records,
            tracking_uri=tracking_uri if experiment_id else None,
            parent_run_id=parent_run_id,
            experiment_id=experiment_id,
            optuna_storage=optuna_url,
            study_name=study_name,
            report_paths={k: str(v) for k, v in paths.items()},
        )
    finally:
        if started_ray:
            ray.shutdown()


def _trial_resources() -> dict[str, float]:
    """What the trial function itself reserves: no CPU. Tune needs a non-empty request: the custom
    resource of a cluster started here, else one byte of memory."""
    import ray

    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) >= 1:
        return {TRIAL_RESOURCE: 1}
    logger.info("The Ray cluster has no %r resource: trials reserve 1 byte of memory, no CPU", TRIAL_RESOURCE)
    return {"memory": 1}


def _opt_value(opts: Sequence[str], key: str, default: Any) -> Any:
    value = default
    for index in range(0, len(opts) - 1, 2):
        if opts[index] == key:
            value = opts[index + 1]
    return value


def _reporter(settings, space):
    from ray.tune import CLIReporter

    metric_columns = {"eval_step": "evals", "objective": "objective"}
    for spec in settings.datasets:
        metric_columns[f"{spec.name}/iteration"] = f"{spec.name} iter"
        metric_columns[f"{spec.name}/total_loss"] = f"{spec.name} loss"
    return CLIReporter(
        metric_columns=metric_columns,
        parameter_columns={name: name for name in space.names},
        max_report_frequency=60,
        max_progress_rows=30,
        print_intermediate_tables=True,
        sort_by_metric=False,
    )


def _print_summary(table, best_text, tracking_uri, optuna_url, study_name, experiment_path, ui_command) -> None:
    print("\nRanked trials (best first; stopped early and failed trials last):\n", flush=True)
    print(table)
    print()
    print(best_text)
    print()
    print(f"Ray Tune results: {experiment_path}")
    print(f"Optuna study:     {study_name!r} in {optuna_url}")
    if tracking_uri:
        print(f"MLflow runs:      {tracking_uri}")
        print(f"Open the MLflow UI with:\n  {ui_command(tracking_uri)}")
    else:
        print("MLflow: not tracked (the store was unreachable at start)")
    sys.stdout.flush()


def options_with(options: SearchOptions, **changes: Any) -> SearchOptions:
    """A copy of ``options`` with ``changes``."""
    return replace(options, **changes)
