#!/usr/bin/env python
"""Searches EQL v2's gamma, mu and alpha with Ray Tune + Optuna, every trial tracked in MLflow.

With no arguments: a complete search on the embedded offline benchmark (LVIS format), a few trials
of the tiny CPU config, each trial a Ray Train run; prints the ranked trials, the best
configuration and the command that opens the MLflow UI. Results go to ./eqlv2_runs/ (Ray Tune
folder, mlflow.db, optuna.db)::

    python tune/search.py
    python tune/search.py --datasets lvis,openimages --num-trials 8
    python tune/search.py --search-space configs/search/alpha_only.yaml --metric 0.5*AP+0.5*APr
    python tune/search.py --resume                         # continue the latest interrupted search
    python tune/search.py --sync --results-dir eqlv2_runs  # send MLflow what an outage kept back
    python tune/search.py --config-file my.yaml SOLVER.MAX_ITER 600 TEST.EVAL_PERIOD 200

Trailing ``KEY VALUE`` pairs override config keys of every trial.

Exit codes: 0 success; 1 no trial completed; 3 MLflow calls are still pending in the results
folder's outbox (the tracking server was unreachable): ``--sync`` replays them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from eqlv2.search.options import BASELINE_LOSSES, SearchOptions  # noqa: E402

#: Exit code while MLflow calls wait in the outbox.
EXIT_PENDING = 3


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="tune/search.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Notes: the MLflow UI command is printed at the end. A Ray cluster started here is "
        "shut down at the end; to use the `ray` CLI against a running local head started by "
        "ray.init(), set RAY_AUTH_MODE=token (ray.init writes ~/.ray/auth_token).",
    )
    _add_what_arguments(parser)
    _add_how_arguments(parser)
    _add_where_arguments(parser)
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides for every trial (options may follow them)")
    return parser


def _add_what_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to search")
    what.add_argument("--search-space", default="configs/search/default.yaml", metavar="YAML",
                      help="search-space file (default: %(default)s; see configs/search/)")
    what.add_argument("--datasets", type=_names, default="lvis", metavar="NAMES",
                      help="comma-separated: lvis, openimages or lvis,openimages (each trial trains "
                      "on each, same gamma/mu/alpha; objective = mean). Default: %(default)s")
    what.add_argument("--config-file", dest="config_files", action="append", default=[], metavar="[NAME=]YAML",
                      help="detectron2 config of a dataset (repeatable; NAME=PATH with several "
                      "datasets). Default: the tiny configs in configs/tiny/")
    what.add_argument("--metric", default="AP", metavar="EXPR",
                      help="what to maximise per dataset: AP, APr, ... or a weighted mix such as "
                      "0.5*AP+0.5*APr (default: %(default)s)")
    what.add_argument("--multi-objective", action="store_true",
                      help="one Optuna objective per dataset (Pareto front reported) instead of the mean")
    what.add_argument("--num-trials", type=_positive, default=None, help="trials the search samples (default: 2, the paper point and one Optuna sample; 3 with --smoke); the reference trials come on top")
    what.add_argument("--seed", type=int, default=42, help="sampler and detectron2 seed (default: %(default)s)")
    what.add_argument("--baseline", choices=("none", *BASELINE_LOSSES), default="sigmoid",
                      help="also train this loss once, as the table's reference row (default: %(default)s)")
    what.add_argument("--noise-seeds", type=_non_negative, default=2, metavar="K",
                      help="re-train the paper point (the first seed point) with K more seeds: the noise "
                           "band every trial is compared with (default: %(default)s)")
    what.add_argument("--smoke", action="store_true",
                      help="the smallest real search (tests): 3 trials of 12 iterations, small "
                      "images, 2 evaluations per run")


def _add_how_arguments(parser: argparse.ArgumentParser) -> None:
    how = parser.add_argument_group("how to run it")
    how.add_argument("--concurrency", type=_positive, default=2,
                     help="trials at once (default: %(default)s: on a 2-CPU machine two one-worker "
                     "trials train faster than one two-worker trial)")
    how.add_argument("--workers-per-trial", type=_positive, default=None,
                     help="Ray Train workers per training run (default: up to 2, as the cluster's "
                     "CPUs divided by the concurrency allow)")
    how.add_argument("--cpus-per-worker", type=_positive, default=1, help="default: %(default)s")
    how.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker")
    how.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                     help="asha: stop trials whose intermediate objective lags (default); fifo: none")
    how.add_argument("--grace-period", type=_positive, default=1,
                     help="ASHA: evaluations before a trial may be stopped (default: %(default)s)")
    how.add_argument("--reduction-factor", type=int, default=2, help="ASHA (default: %(default)s)")
    how.add_argument("--sampler", choices=("tpe", "random", "nsga2"), default="tpe",
                     help="Optuna sampler (default: %(default)s)")
    how.add_argument("--max-failures", type=int, default=0,
                     help="retries of a Ray Train run whose worker died (default: %(default)s)")
    how.add_argument("--ray-address", default=None, help="join a running Ray cluster (default: start one)")
    how.add_argument("--num-cpus", type=_positive, default=None, help="CPUs of a Ray cluster started here")


def _add_where_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("where results go")
    where.add_argument("--results-dir", default="eqlv2_runs",
                       help="folder of the default stores (default: ./%(default)s)")
    where.add_argument("--storage-path", default=None,
                       help="Ray Tune results (default: RESULTS_DIR/ray_results)")
    where.add_argument("--name", default=None,
                       help="Tune experiment name (default: eqlv2_search_<time>; --resume: the latest)")
    where.add_argument("--mlflow-uri", default=None,
                       help="MLflow tracking URI, e.g. http://host:5000 (default: sqlite:////abs/RESULTS_DIR/mlflow.db)")
    where.add_argument("--mlflow-experiment", default="eqlv2-search", help="default: %(default)s")
    where.add_argument("--optuna-storage", default=None,
                       help="SQLAlchemy URL or SQLite file of the study (default: RESULTS_DIR/optuna.db)")
    where.add_argument("--study-name", default=None,
                       help="Optuna study (default: derived from datasets, metric and space file, so "
                       "a repeated search continues its study)")
    where.add_argument("--baseline-gradients", action="append", default=[], metavar="[NAME=]CSV",
                       help="a baseline's gradient-statistics CSV, drawn in the ratio plots")
    where.add_argument("--resume", action="store_true",
                       help="continue an interrupted search (same arguments): the Tune experiment "
                       "and the study, without re-running finished trials")
    where.add_argument("--sync", action="store_true",
                       help="replay the MLflow calls kept in RESULTS_DIR/mlflow_outbox while the "
                       "tracking server was unreachable (after a crash or an outage), then exit: "
                       f"0 when nothing is left, {EXIT_PENDING} while calls are pending")
    where.add_argument("-v", "--verbose", action="store_true", help="show the trials' training logs")


def options_from_args(argv: list[str]) -> SearchOptions:
    """Parses ``argv`` into :class:`SearchOptions`."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.sync:  # a separate command: nothing else is read
        return SearchOptions(results_dir=args.results_dir, argv=tuple(argv), sync=True)
    if len(args.opts) % 2:
        parser.error(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    return SearchOptions(**vars(args), argv=tuple(argv))


def sync(results_dir: str) -> int:
    """``--sync``: replays the outboxes of ``results_dir`` with a progress display; the exit code."""
    from eqlv2.search.mlflow_outbox import outbox_folders, pending_count, replay_all

    root = Path(results_dir).expanduser().resolve() / "mlflow_outbox"
    total = sum(pending_count(folder) for folder in outbox_folders(root))
    print(f"{total} MLflow call(s) pending in {root}", flush=True)
    done = 0

    def progress(entry) -> None:
        nonlocal done
        done += 1
        if done == total or done % max(1, total // 20) == 0:
            print(f"  replayed {done}/{total} ({entry.op})", flush=True)

    report = replay_all(root, progress=progress)
    print(report.summary())
    for seq, op, error in report.failed:
        print(f"  rejected by the server: entry {seq} ({op}): {error[:300]}")
    if report.pending:
        print(f"{report.pending} call(s) still pending: run this again once the server answers.")
    return EXIT_PENDING if report.pending else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("ray", "mlflow", "alembic", "optuna", "detectron2", "fvcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    options = options_from_args(argv)
    if options.sync:
        return sync(options.results_dir)
    # Imported once the arguments are read: Ray, detectron2 and MLflow take seconds to import,
    # which --help and a bad flag should not wait for.
    from eqlv2.search.driver import run_search

    outcome = run_search(options)
    print(f"\n{outcome.summary}", flush=True)
    if outcome.best is None:
        return 1
    return EXIT_PENDING if outcome.mlflow_pending else 0


if __name__ == "__main__":
    sys.exit(main())
