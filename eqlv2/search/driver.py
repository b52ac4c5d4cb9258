"""The search driver (``tune/search.py``): Ray Tune + Optuna over EQL v2's hyper-parameters,
tracked in MLflow. :func:`run_search` is a pipeline of named steps: plan (every input checked
before anything starts), datasets, Ray, tracking, trial settings and the search's state file, the
Tune experiment, then the reference trials and the ranked outcome.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import ray
from detectron2.data import DatasetCatalog
from ray import tune
from ray.tune.search import ConcurrencyLimiter

from eqlv2.engine import setup_cfg
from eqlv2.engine.base_checkpoint import ensure_base_checkpoint
from eqlv2.raytrain.launch import pin_dataset_roots, run_exists

from . import ranking
from .credentials import check_url_has_no_credentials
from .mlflow_client import experiment_url, ui_command
from .mlflow_driver import SearchTracking
from .mlflow_trial_run import TrialRunCreator
from .mlflow_worker import read_gradient_ratio
from .options import SearchOptions
from .optuna_study import (
    STEP_KEY,
    TrialStateOptunaSearch,
    build_sampler,
    build_scheduler,
    fail_orphaned_trials,
    open_storage,
    pending_seed_points,
)
from .ray_local import init_local_ray
from .references import REFERENCE_KEY, reference_configs, reference_label
from .settings import RUN_ID_KEY, TrialSettings, dataset_specs, parse_objective, repository_root
from .space import load_search_space
from .stores import TuneStorage, prepare_writable_dir, store_url
from .trial import run_trial

logger = logging.getLogger(__name__)

#: Overrides of ``--smoke``: the smallest real search (a few iterations, small images, two
#: evaluations per run so that ASHA has an intermediate result to act on, each on the first 40
#: validation images: every frequency group still has ground truth there).
SMOKE_OVERRIDES: tuple[str, ...] = (
    "SOLVER.MAX_ITER", "12", "SOLVER.STEPS", "(10,)", "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "100000",
    "TEST.EVAL_PERIOD", "6", "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "TEST.EQLV2.MAX_IMAGES", "40",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160", "MODEL.EQLV2.LOG_PERIOD", "6",
    "MODEL.EQLV2.BASE_CHECKPOINT_CONFIG", "",  # a smoke run tests the plumbing: no base to train
)  # fmt: skip

#: Completed trials Optuna's parameter-importance plot needs: fewer cannot carry a conclusion.
MIN_IMPORTANCE_TRIALS = 8
#: The search's state in its Tune folder (written once, by the driver), what ``--resume`` reads,
#: and the latest search of a Tune storage folder (``--resume`` without ``--name``).
STATE_FILE, LATEST_FILE = "eqlv2_search.json", "latest_search.json"
#: Custom resource a Ray cluster started here offers for the trials' driver functions: a trial
#: takes one, no CPU, so its Ray Train workers can have every core (Ray's advice for Tune + Train).
TRIAL_RESOURCE = "eqlv2_trial"
#: Seconds Tune waits for a stopped trial's function to end before it reuses the process (its
#: default, 2 s, is short for a trial that kills its Ray Train run on the way out; a reset that
#: times out fails the next trial).
TRIAL_PROCESS_ENV = {"TUNE_FUNCTION_THREAD_TIMEOUT_S": "30"}
#: Options the trials read as they are (:class:`TrialSettings` fields of the same name).
_TRIAL_OPTIONS = ("multi_objective", "use_gpu", "cpus_per_worker", "max_failures", "seed", "resume")


@dataclass
class SearchPlan:
    """Everything fixed before Ray starts (inputs checked, locations absolute, names chosen): the
    trials' ``settings`` as far as known then (:func:`prepare_datasets` adds the schedules,
    :func:`trial_settings` the workers per trial and the MLflow ids) and the driver's own facts."""

    options: SearchOptions
    settings: TrialSettings
    results_dir: Path
    storage: TuneStorage
    space_file: Path
    tracking_uri: str
    parent_run_id: str | None = None  # of the search being resumed
    env: dict[str, str] = field(default_factory=dict)

    @property
    def experiment_path(self) -> str:
        return self.storage.join(self.settings.search_name)

    @property
    def reports_dir(self) -> Path:
        """Where the ranked reports are written: the experiment folder, or for a remote storage a
        local folder under ``--results-dir`` whose files are then copied to the experiment."""
        if self.storage.is_remote:
            return self.results_dir / "reports" / self.settings.search_name
        return Path(self.experiment_path)


@dataclass
class SearchOutcome:
    """What a search produced: the trials' ``records``, the ``best`` one (None if no trial
    completed), the ``summary`` to show, and the MLflow calls still in the outbox
    (``tune/search.py --sync`` replays them)."""

    records: list[ranking.TrialRecord]
    best: ranking.TrialRecord | None
    summary: str
    mlflow_pending: int = 0


def run_search(options: SearchOptions) -> SearchOutcome:
    """Runs (or resumes) a search; a bad option raises SystemExit naming it."""
    _configure_libraries()
    plan = plan_search(options)
    prepare_datasets(plan)
    with ray_cluster(options, plan.env):
        tracking = open_tracking(plan)
        settings = trial_settings(plan, tracking)
        record_search(plan, settings, tracking)
        tuner = build_tuner(plan, settings, tracking)
        _announce(plan, settings)
        results = list(tuner.fit())
        references = build_reference_tuner(plan, settings, tracking)
        results += list(references.fit()) if references is not None else []
        return report_outcome(plan, settings, tracking, results)


def _configure_libraries() -> None:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter shows chosen columns
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # a killed driver loses ≤ 2 s of state
    os.environ.update(_trial_process_env())  # read by the trial processes of a local instance
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no phoning home from a search
    # No "View run ... at" line per closed trial run, nor the GET of the run MLflow makes to print it.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # The driver's own MLflow calls; trials and their workers set theirs lower (TRIAL_HTTP_LIMITS).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def _search_name(options: SearchOptions, storage: TuneStorage) -> str:
    """``--name``, the latest search's on ``--resume``, else a new time-stamped one."""
    name = options.name
    if options.resume and not name:
        name = storage.read_json(LATEST_FILE).get("name")
        if not name:
            raise SystemExit(f"--resume: no search to resume in {storage.location} (give --name)")
    name = name or "eqlv2_search_" + time.strftime("%Y%m%d_%H%M%S")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise SystemExit(f"--name {name!r}: use letters, digits and _ . + - only")
    if run_exists(storage.location, name) and not options.resume:
        raise SystemExit(f"experiment {storage.join(name)} exists: add --resume to continue it, or give another --name")
    return name


def _space_path(value: str) -> Path:
    """The search-space file as given, else relative to the repository."""
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and (repository_root() / path).exists():
        path = repository_root() / path
    return path.resolve()


def plan_search(options: SearchOptions) -> SearchPlan:
    """Checks the inputs and fixes locations and names (those of the search resumed, if so)."""
    results_dir = Path(options.results_dir).expanduser().resolve()
    storage = TuneStorage.parse(options.storage_path or results_dir / "ray_results")
    try:
        for flag, url in (("--mlflow-uri", options.mlflow_uri), ("--optuna-storage", options.optuna_storage)):
            if url:
                check_url_has_no_credentials(url, flag)
        prepare_writable_dir(results_dir, "--results-dir")
        storage.check_writable("--storage-path")
        name, space_file = _search_name(options, storage), _space_path(options.search_space)
        space, objective = load_search_space(space_file), parse_objective(options.metric)
        specs = dataset_specs(options.datasets, options.config_files)
        objective.check(specs)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(str(error)) from error
    if options.multi_objective and len(specs) < 2:
        raise SystemExit("--multi-objective needs at least two --datasets")
    state = storage.read_json(name, STATE_FILE) if options.resume else {}
    # Later overrides win: the space file's trial budget, then --smoke's, then the command line's.
    opts = space.trial_overrides + (SMOKE_OVERRIDES if options.smoke else ()) + options.opts
    kind = "mo" if options.multi_objective else objective.slug
    study_name = f"eqlv2_{'+'.join(options.datasets)}_{kind}_{space_file.stem}{'_smoke' if options.smoke else ''}"
    settings = TrialSettings(
        space=space, datasets=specs, objective=objective, opts=opts, search_name=name,
        remote_storage=storage.location if storage.is_remote else None,
        optuna_storage=state.get("optuna_storage") or store_url(options.optuna_storage, results_dir / "optuna.db"),
        study_name=state.get("study_name") or options.study_name or study_name,
        log_period=int(dict(zip(opts[::2], opts[1::2], strict=False)).get("MODEL.EQLV2.LOG_PERIOD", 20)),
        **{key: getattr(options, key) for key in _TRIAL_OPTIONS},
    )  # fmt: skip
    tracking_uri = state.get("tracking_uri") or store_url(options.mlflow_uri, results_dir / "mlflow.db", False)
    return SearchPlan(options, settings, results_dir, storage, space_file, tracking_uri, state.get("parent_run_id"))


def prepare_datasets(plan: SearchPlan) -> None:
    """Once, before any trial: builds each config (a bad one stops here), generates its data and
    base checkpoint, and reads the baseline gradient statistics the plots compare with."""
    plan.env, settings = pin_dataset_roots(), plan.settings
    logger.info("Building configs and generating the data they use (once)")
    for spec in settings.datasets:
        try:
            cfg = setup_cfg(spec.config_file, list(settings.opts))
            for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
                start = time.perf_counter()
                count = len(DatasetCatalog.get(name))
                logger.info("Dataset %s: %d images (%.1f s)", name, count, time.perf_counter() - start)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"bad config or override: {error}") from error
        settings.schedules[spec.name] = (int(cfg.SOLVER.MAX_ITER), int(cfg.TEST.EVAL_PERIOD))
        ensure_base_checkpoint(cfg)  # the config's base checkpoint, trained once before any trial
    for entry in plan.options.baseline_gradients:
        dataset, _, path = entry.partition("=")
        if not path:
            dataset, path = settings.datasets[0].name, entry
        settings.baseline_ratios[dataset] = tuple(read_gradient_ratio(path))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def ray_cluster(options: SearchOptions, env: dict[str, str]) -> Iterator[None]:
    """The running Ray, ``--ray-address``, or a new loopback-only local instance (shut down at the
    end). Its dashboard serves the State API that Ray Train's placement-group cleaner needs to
    release the workers of stopped trials."""
    if ray.is_initialized():
        yield
        return
    if options.ray_address:
        ray.init(address=options.ray_address, runtime_env={"env_vars": {**_trial_process_env(), **env}}, log_to_driver=options.verbose)
    else:
        init_local_ray(
            num_cpus=options.num_cpus,
            resources={TRIAL_RESOURCE: options.concurrency},  # at most that many trials run
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=_free_port(),
            configure_logging=True,
            logging_level=logging.WARNING,
            log_to_driver=options.verbose,
        )
    try:
        yield
    finally:
        ray.shutdown()


def open_tracking(plan: SearchPlan) -> SearchTracking | None:
    """The MLflow store and the search's parent run (reopened on resume); None if unreachable."""
    artifacts, outbox = plan.results_dir / "mlartifacts", plan.results_dir / "mlflow_outbox"
    name, experiment = plan.settings.search_name, plan.options.mlflow_experiment
    return SearchTracking.open(plan.tracking_uri, experiment, artifacts, name, plan.parent_run_id, outbox)


def _workers_per_trial(options: SearchOptions, cluster: dict[str, float]) -> int:
    if options.workers_per_trial:
        return options.workers_per_trial
    per_trial = max(1, int(cluster.get("CPU", 1)) // max(1, options.concurrency))
    workers = max(1, min(2, per_trial // max(1, options.cpus_per_worker)))
    if options.use_gpu:
        workers = max(1, min(workers, int(cluster.get("GPU", 1)) // max(1, options.concurrency)))
    return workers


def trial_settings(plan: SearchPlan, tracking: SearchTracking | None) -> TrialSettings:
    """The plan's trial settings with the workers per trial (from the cluster) and the MLflow ids."""
    ids: dict[str, Any] = {}
    if tracking is not None:
        ids = {"tracking_uri": tracking.tracking_uri, "experiment_id": tracking.experiment_id,
               "parent_run_id": tracking.parent_run_id, "mlflow_outbox": tracking.outbox_root}  # fmt: skip
    return replace(plan.settings, num_workers=_workers_per_trial(plan.options, ray.cluster_resources()), **ids)


def record_search(plan: SearchPlan, settings: TrialSettings, tracking: SearchTracking | None) -> None:
    """Writes the search's state file and, for a new search, its settings, search space and
    command line on the parent run."""
    options, name = plan.options, settings.search_name
    state = {"name": name, "tracking_uri": settings.tracking_uri, "experiment_id": settings.experiment_id,
             "parent_run_id": settings.parent_run_id, "optuna_storage": settings.optuna_storage,
             "study_name": settings.study_name, "argv": list(options.argv), "options": asdict(options)}  # fmt: skip
    plan.storage.write_json(state, name, STATE_FILE)
    plan.storage.write_json({"name": name}, LATEST_FILE)
    if tracking is None or plan.parent_run_id is not None:
        return
    params = {
        **{f"space/{k}": v for k, v in settings.space.describe().items()},
        "search_space_file": str(plan.space_file),
        **settings.run_params(),
        "metric": settings.objective.text,
        "workers_per_trial": settings.num_workers,
        "optuna_storage": settings.optuna_storage,
        "study_name": settings.study_name,
        "tune_storage": plan.storage.location,
        **{key: getattr(options, key) for key in ("multi_objective", "num_trials", "concurrency", "use_gpu")},
        **{key: getattr(options, key) for key in ("scheduler", "sampler", "seed", "smoke", "baseline", "noise_seeds")},
    }
    command = shlex.join(["python", "tune/search.py", *options.argv]) + "\n"
    tracking.log_start(params, {plan.space_file.name: plan.space_file.read_text(), "command.txt": command})


def _trial_process_env() -> dict[str, str]:
    """:data:`TRIAL_PROCESS_ENV`, each value the driver's own where its environment sets one."""
    return {key: os.environ.get(key, value) for key, value in TRIAL_PROCESS_ENV.items()}


def _staged_trials(concurrency: int) -> int:
    """Trials the searcher may suggest beyond ``concurrency``: they wait, staged, for a running
    trial to end, and Tune hands them its process (``reuse_actors``: Tune keeps a finished
    trial's process only for a staged trial). Only where the cluster's trial resource, not the
    searcher, caps the running trials at ``concurrency`` (the local instance); else none."""
    slots = ray.cluster_resources().get(TRIAL_RESOURCE, 0)
    return max(1, concurrency // 4) if 1 <= slots <= concurrency else 0


def _trial_resources() -> dict[str, float]:
    """No CPU for the trial function itself; Tune needs a non-empty request."""
    if ray.cluster_resources().get(TRIAL_RESOURCE, 0) >= 1:
        return {TRIAL_RESOURCE: 1}
    logger.info("The Ray cluster has no %r resource: trials reserve 1 byte of memory, no CPU", TRIAL_RESOURCE)
    return {"memory": 1}


def _reporter(settings: TrialSettings) -> tune.CLIReporter:
    metric_columns = {"eval_step": "evals", "objective": "objective"}
    for spec in settings.datasets:
        metric_columns[f"{spec.name}/iteration"] = f"{spec.name} iter"
        metric_columns[f"{spec.name}/total_loss"] = f"{spec.name} loss"
    return tune.CLIReporter(
        metric_columns=metric_columns,
        parameter_columns={name: name for name in settings.space.names},
        max_report_frequency=60,
        max_progress_rows=30,
        print_intermediate_tables=True,
        sort_by_metric=False,
    )


#: One trial as Tune runs it: :func:`~eqlv2.search.trial.run_trial`, or a stand-in.
TrialFunction = Callable[[dict[str, Any], TrialSettings], None]


def _tuner(
    plan: SearchPlan, settings: TrialSettings, tracking: SearchTracking | None, name: str,
    new: Callable[[], dict[str, Any]], trial_function: TrialFunction = run_trial,
) -> tune.Tuner:  # fmt: skip
    """The Tune experiment ``name``: restored on ``--resume`` when Tune saved it, else a new one
    with the ``tune.Tuner`` arguments ``new()`` gives. A failed trial never stops the search (Tune
    records it, the study marks it ``FAIL``)."""
    trainable = tune.with_parameters(trial_function, settings=settings)
    trainable = tune.with_resources(trainable, _trial_resources())
    path = plan.storage.join(name)
    if plan.options.resume and tune.Tuner.can_restore(path):
        logger.info("Resuming Tune experiment %s", path)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    run_config = tune.RunConfig(
        name=name,
        storage_path=plan.storage.location,
        callbacks=[tracking] if tracking else [],
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        progress_reporter=_reporter(settings),
        verbose=1,
    )
    return tune.Tuner(trainable, run_config=run_config, **new())


def trial_dirname(trial) -> str:
    """A trial's Tune folder: its trainable, id and parameters, as Tune names it, without the MLflow
    run id of its config (32 characters that would push the parameters out of the name)."""
    values = sorted((k, v) for k, v in trial.config.items() if k != RUN_ID_KEY and not isinstance(v, dict))
    params = ",".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in values)
    return f"{trial.trainable_name}_{trial.trial_id}_{params}"[:130]


def build_tuner(
    plan: SearchPlan, settings: TrialSettings, tracking: SearchTracking | None, trial_function: TrialFunction = run_trial
) -> tune.Tuner:
    """The search's Tune experiment: the interrupted one restored (``--resume``), else a new one
    over the study, with its searcher and scheduler."""
    options = plan.options

    def new_search() -> dict[str, Any]:
        storage = open_storage(settings.optuna_storage)
        directions = ["maximize"] * (len(settings.datasets) if settings.multi_objective else 1)
        study = optuna.create_study(storage=storage, study_name=settings.study_name, load_if_exists=True, directions=directions)
        if options.resume:
            logger.warning("No Tune state in %s yet: starting the search there afresh", plan.experiment_path)
            fail_orphaned_trials(study, storage, settings.search_name, set(), "asked by a search driver that was interrupted")
        total_evals = sum(settings.evaluations(spec.name) for spec in settings.datasets)
        try:
            scheduler = build_scheduler(options.scheduler, total_evals, options.grace_period, options.reduction_factor)
        except ValueError as error:
            raise SystemExit(str(error)) from error
        live = options.concurrency + _staged_trials(options.concurrency)
        searcher = ConcurrencyLimiter(_searcher(plan, settings, storage, study), max_concurrent=live)
        tune_config = tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=options.num_trials, reuse_actors=True, trial_dirname_creator=trial_dirname
        )  # fmt: skip
        return {"tune_config": tune_config}

    return _tuner(plan, settings, tracking, settings.search_name, new_search, trial_function)


def _searcher(plan: SearchPlan, settings: TrialSettings, storage, study: optuna.Study) -> TrialStateOptunaSearch:
    metric: Any = settings.objective_keys() if settings.multi_objective else "objective"
    mode: Any = ["max"] * len(metric) if settings.multi_objective else "max"
    metrics = [f"{spec.name}/{m}" for spec in settings.datasets for m in spec.metrics]
    return TrialStateOptunaSearch(
        settings.space.optuna_distributions(), metric, mode,
        points_to_evaluate=pending_seed_points(study, settings.space.seed_points) or None,
        sampler=build_sampler(plan.options.sampler, plan.options.seed), study_name=settings.study_name,
        storage=storage, experiment=settings.search_name, record_keys=["objective", *settings.objective_keys(), STEP_KEY, *metrics],
        on_suggest=TrialRunCreator(settings) if settings.tracked else None,
    )  # fmt: skip


def build_reference_tuner(plan: SearchPlan, settings: TrialSettings, tracking: SearchTracking | None) -> tune.Tuner | None:
    """The reference trials (:mod:`eqlv2.search.references`) as a second Tune experiment; None
    when there are none. No scheduler, no searcher: each runs to its end, outside the study."""
    options = plan.options
    configs = reference_configs(settings.space, options.baseline, options.noise_seeds, options.seed)
    if not configs:
        return None

    def new_references() -> dict[str, Any]:
        logger.info("Reference trials: %s", ", ".join(reference_label(c) for c in configs))
        return {"param_space": {REFERENCE_KEY: tune.grid_search(configs)},
                "tune_config": tune.TuneConfig(max_concurrent_trials=options.concurrency, reuse_actors=True)}  # fmt: skip

    return _tuner(plan, settings, tracking, f"{settings.search_name}-references", new_references)


def _announce(plan: SearchPlan, settings: TrialSettings) -> None:
    options = plan.options
    references = len(reference_configs(settings.space, options.baseline, options.noise_seeds, options.seed))
    logger.info(
        "Search %s: %d trial(s) of %s, %d Ray Train worker(s) per trial, concurrency %d, %s scheduler, metric %s; "
        "study %r; then %d reference trial(s)", settings.search_name, options.num_trials, ", ".join(settings.dataset_names),
        settings.num_workers, options.concurrency, options.scheduler, settings.objective.text, settings.study_name, references,
    )  # fmt: skip


def _importance_note(study: optuna.Study) -> str:
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if complete >= MIN_IMPORTANCE_TRIALS:
        return f"Parameter importance (Optuna, fANOVA) from {complete} completed trials: optuna/optuna_param_importance.png"
    return (
        f"Parameter importance not computed: {complete} completed trial(s) in the study, fewer than the "
        f"{MIN_IMPORTANCE_TRIALS} it needs to mean something."
    )


def _summary(plan: SearchPlan, table: str, best_text: str, tracking: SearchTracking | None) -> str:
    lines = [
        "Ranked trials (best first; stopped early and failed trials last; reference trials `ref`):\n",
        f"{table}\n\n{best_text}\n",
        f"Ray Tune results: {plan.experiment_path}",
        f"Optuna study:     {plan.settings.study_name!r} in {plan.settings.optuna_storage}",
    ]
    if tracking is None:
        return "\n".join([*lines, "MLflow: not tracked (the store was unreachable at start)"])
    uri, state = tracking.tracking_uri, tracking.outbox_state
    ui_base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    lines += [f"MLflow runs:      {uri}", f"Open the MLflow UI with:\n  {ui_command(uri)}"]
    lines.append(f"  then the search's trials: {experiment_url(ui_base, tracking.experiment_id)}")
    if state is not None and state.pending:
        lines.append(f"MLflow is missing {state.pending} call(s) of this search: once the server is back, replay them with\n"
                     f"  python tune/search.py --sync --results-dir {plan.results_dir}")  # fmt: skip
    lines.append(state.summary() + f" (outbox {tracking.outbox_root})" if state else "")
    return "\n".join(lines)


def report_outcome(plan: SearchPlan, settings: TrialSettings, tracking: SearchTracking | None, results) -> SearchOutcome:
    """Ranks the trials, writes the reports and closes the parent run."""
    study = optuna.load_study(study_name=settings.study_name, storage=open_storage(settings.optuna_storage))
    records = ranking.records_from_results(list(results), settings, study)
    band = ranking.paper_point_band(records, settings) if plan.options.noise_seeds else None
    table, best = ranking.format_table(records, settings, band), ranking.best_record(records)
    texts = [ranking.reference_text(records, settings, band), ranking.best_config_text(best, settings, band)]
    best_text = "\n".join(text for text in texts if text)
    if settings.multi_objective:
        front = sorted(r.trial_id for r in records if r.pareto)
        best_text += "\nPareto front (one objective per dataset): " + (", ".join(front) or "empty")
    best_text += "\n" + _importance_note(study)
    paths = list(ranking.write_reports(records, settings, plan.reports_dir, band).values())
    plan.storage.upload(paths, settings.search_name)
    interrupted = any(r.status == "running" for r in records)
    if tracking is not None:
        tracking.close_open_runs({r.trial_id: r.status for r in records})
        tracking.log_optuna_figures(study, settings.objective.text, MIN_IMPORTANCE_TRIALS)
        metrics, tags = ranking.search_metrics(records, settings, band)
        tracking.finish(paths, {"summary.txt": table + "\n\n" + best_text + "\n"}, metrics, tags, interrupted)
    if interrupted:
        best_text += "\n\nThe search was interrupted: continue it with the same command and --resume."
    pending = tracking.outbox_state.pending if tracking and tracking.outbox_state else 0
    return SearchOutcome(records, best, _summary(plan, table, best_text, tracking), pending)
