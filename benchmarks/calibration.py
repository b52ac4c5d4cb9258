"""Does the default trial learn? Sigmoid against EQL v2's paper point over seeds, on the default budget.

Trains default search trials (``benchmarks/default_trial.py``: the tiny config, the default
search space's ``trial_overrides``, Ray Train with 1 worker x 1 CPU, from the cached base
checkpoint) with the plain sigmoid loss and with EQL v2 at the paper's point (gamma 12, mu 0.8,
alpha 4), ``--seeds`` seeds each, and prints per loss the mean +- sample standard deviation over
the seeds of

* LVIS: box AP, APr, APc, APf and mask AP, APr, APc, APf (the LVIS protocol on
  ``synthetic_lvis_val``);
* OpenImages: AP@0.5 (the Challenge 2019 protocol on ``synthetic_openimages_val``).

The targets of the benchmark (issue 8): on the default budget, EQL v2 at the paper's point
reaches box AP >= 20 (OpenImages AP@0.5 >= 20) with APr, APc and APf each above 0. The sigmoid
rows say whether the task is learnable at all; they are what the benchmark is calibrated on.

``--backend ray`` (default) trains each trial as the search does; ``--backend local`` as one
``train/train_net.py`` process with the same total batch (the same learning, no Ray start-up or
DDP), ``--jobs`` at a time, which is faster on a loaded machine.

To compare other settings than the default (the option table of the README), ``--losses``
picks the losses, ``--first-seed`` the first trial seed, and trailing ``KEY VALUE`` pairs are
appended to the default ``trial_overrides`` (e.g. ``SOLVER.MAX_ITER 400 SOLVER.STEPS "(360,)"``,
or ``MODEL.EQLV2.BASE_CHECKPOINT_CONFIG other_base.yaml``); every trial's wall time is printed
beside its metrics with the load average, and ``--keep`` keeps the trials' folders.

Usage: ``python benchmarks/calibration.py [--datasets lvis,openimages] [--seeds 3]
[--losses sigmoid,eqlv2] [--backend ray|local] [--jobs 2] [--json out.json] [KEY VALUE ...]``,
``python benchmarks/calibration.py --collect DIR [--datasets lvis] [--seeds 3]``
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_trial import (  # noqa: E402
    CONFIGS,
    PAPER_POINT,
    SIGMOID,
    fit_trial,
    local_metrics,
    prepare,
    train_local,
    trial_opts,
    use_project_benchmark,
)

LOSSES = {"sigmoid": SIGMOID, "eqlv2 (12, 0.8, 4)": PAPER_POINT}
#: ``--losses`` names of the rows of :data:`LOSSES`.
LOSS_NAMES = {"sigmoid": "sigmoid", "eqlv2": "eqlv2 (12, 0.8, 4)"}
COLUMNS = {
    "lvis": {
        "box AP": "bbox/AP", "APr": "bbox/APr", "APc": "bbox/APc", "APf": "bbox/APf",
        "mask AP": "segm/AP", "mAPr": "segm/APr", "mAPc": "segm/APc", "mAPf": "segm/APf",
    },
    "openimages": {"AP@0.5": "bbox/AP"},
}  # fmt: skip


def mean_std(values: list[float]) -> str:
    """``mean +- sample std`` (std ``n/a`` for one value)."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = f"{statistics.stdev(values):.1f}" if len(values) > 1 else "n/a"
    return f"{mean:.1f} +- {std}"


def table(dataset: str, runs: dict[str, list[dict]]) -> str:
    """The printed table of one dataset: one row per loss, one column per metric."""
    columns = COLUMNS[dataset]
    header = f"{'loss':<20}{'seeds':>6}" + "".join(f"{name:>14}" for name in columns)
    lines = [header, "-" * len(header)]
    for loss, metrics in runs.items():
        cells = [mean_std([m[key] for m in metrics if key in m]) for key in columns.values()]
        lines.append(f"{loss:<20}{len(metrics):>6}" + "".join(f"{cell:>14}" for cell in cells))
    return "\n".join(lines)


def _opts(loss: str, seed: int, extra: list[str]) -> list[str]:
    """One trial's overrides: the default trial's, the loss, the seed, then ``extra``."""
    return [*trial_opts(LOSSES[loss], seed), *extra]


def _run_ray(datasets, seeds, work, losses, extra) -> dict[str, dict[str, list[dict]]]:
    import ray

    all_runs: dict[str, dict[str, list[dict]]] = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for dataset in datasets:
            runs: dict[str, list[dict]] = {loss: [] for loss in losses}
            for seed in seeds:
                for loss in losses:
                    start = time.perf_counter()
                    out = os.path.join(work, f"{dataset}-{seed}-{loss.split()[0]}")
                    runs[loss].append(fit_trial(str(CONFIGS[dataset]), _opts(loss, seed, extra), out))
                    _report(dataset, loss, seed, runs[loss][-1], time.perf_counter() - start)
            all_runs[dataset] = runs
    finally:
        ray.shutdown()
    return all_runs


def _run_local(datasets, seeds, work, jobs: int, losses, extra, threads: int = 1) -> dict[str, dict[str, list[dict]]]:
    """Every trial as one ``train_net.py`` process, ``jobs`` at a time."""
    pending = [(d, loss, seed) for d in datasets for seed in seeds for loss in losses]
    all_runs: dict[str, dict[str, list[dict]]] = {d: {loss: [] for loss in losses} for d in datasets}
    running: list = []
    while pending or running:
        while pending and len(running) < jobs:
            dataset, loss, seed = pending.pop(0)
            out = os.path.join(work, f"{dataset}-{seed}-{loss.split()[0]}")
            proc = train_local(str(CONFIGS[dataset]), _opts(loss, seed, extra), out, threads=threads)
            running.append((proc, dataset, loss, seed, out, time.perf_counter()))
        time.sleep(2)
        for item in [r for r in running if r[0].poll() is not None]:
            running.remove(item)
            proc, dataset, loss, seed, out, start = item
            metrics = local_metrics(out)
            all_runs[dataset][loss].append(metrics)
            _report(dataset, loss, seed, metrics, time.perf_counter() - start)
    return all_runs


def _collect(folders, datasets, seeds, losses) -> dict[str, dict[str, list[dict]]]:
    """The final metrics of the local trials kept in ``folders`` (``--keep`` of earlier runs)."""
    all_runs: dict[str, dict[str, list[dict]]] = {d: {loss: [] for loss in losses} for d in datasets}
    for dataset in datasets:
        for seed in seeds:
            for loss in losses:
                for folder in folders:
                    out = os.path.join(folder, f"{dataset}-{seed}-{loss.split()[0]}")
                    if os.path.isfile(os.path.join(out, "metrics.json")):
                        try:
                            metrics = local_metrics(out)
                        except RuntimeError:
                            continue  # unfinished
                        all_runs[dataset][loss].append(metrics)
                        _report(dataset, loss, seed, metrics, float("nan"))
                        break
    return all_runs


def _report(dataset, loss, seed, metrics, seconds) -> None:
    shown = {k: round(metrics[v], 2) for k, v in COLUMNS[dataset].items() if v in metrics}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    timing = f" ({seconds:.0f} s, load average {load})" if seconds == seconds else ""  # NaN: collected
    print(f"  {dataset} {loss} seed {seed}: {shown}{timing}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="lvis,openimages")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--backend", choices=("ray", "local"), default="ray",
        help="ray: each trial as the search runs it (Ray Train, 1 worker x 1 CPU); local: each "
        "trial as one train_net.py process with the same total batch, --jobs at a time",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2, help="local backend: trials at a time")
    parser.add_argument("--threads", type=int, default=1, help="local backend: torch threads per trial")
    parser.add_argument("--json", help="also write every run's metrics to this file")
    parser.add_argument("--losses", default="sigmoid,eqlv2", help="comma-separated: sigmoid, eqlv2")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1")
    parser.add_argument("--keep", help="keep the trials' folders here (default: a temporary folder)")
    parser.add_argument(
        "--collect", action="append", metavar="DIR",
        help="train nothing: print the tables of the local trials kept in DIR (--keep) by earlier "
        "runs, for --datasets, --losses and the seeds given (repeatable; a trial missing is left out)",
    )  # fmt: skip
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides after the default trial's")
    args = parser.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = sorted(set(datasets) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {sorted(CONFIGS)}")
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    if not names or set(names) - set(LOSS_NAMES):
        parser.error(f"--losses: choose from {sorted(LOSS_NAMES)}")
    losses = [LOSS_NAMES[n] for n in names]
    if len(args.opts) % 2:
        parser.error(f"overrides come in KEY VALUE pairs: {args.opts}")
    seeds = range(args.first_seed, args.first_seed + args.seeds)

    if args.collect:
        all_runs = _collect(args.collect, datasets, seeds, losses)
        for dataset, runs in all_runs.items():
            print(f"\n{dataset}: kept local trials of {', '.join(args.collect)}, mean +- std over the seeds found\n{table(dataset, runs)}")
        return 0
    use_project_benchmark()
    for dataset in datasets:
        seconds = prepare(str(CONFIGS[dataset]), [*trial_opts(SIGMOID, 0), *args.opts])
        print(f"{dataset}: preparation (data, base checkpoint) {seconds:.0f} s", flush=True)
    if args.opts:
        print(f"overrides after the default trial's: {' '.join(args.opts)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="eqlv2-calibration-") as tmp:
        work = args.keep or tmp
        if args.backend == "ray":
            all_runs = _run_ray(datasets, seeds, work, losses, args.opts)
        else:
            all_runs = _run_local(datasets, seeds, work, args.jobs, losses, args.opts, args.threads)
    for dataset, runs in all_runs.items():
        print(f"\n{dataset}: default trial ({args.backend}), mean +- std over {args.seeds} seed(s)\n{table(dataset, runs)}")
    if args.json:
        Path(args.json).write_text(json.dumps(all_runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
