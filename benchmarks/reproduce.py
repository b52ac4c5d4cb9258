"""Reproduce the paper's tables and figures on the offline benchmark (or any LVIS-format config).

Trains every row of the Table 1, 2, 7, 8 and 9 analogues for each seed, evaluates it, and writes
to ``--output``:

* ``report.md``: the tables as mean ± std over the seeds (AP, APr, APc, APf, APb), and the
  paper's three central claims, each with the difference, its standard error and whether it
  holds beyond 2 standard errors;
* ``figure1_2_gradient_ratio.png`` (softmax CE, EQL v1 and EQL v2 at three iterations, seed
  mean), ``figure3_weight_norms.png`` (softmax CE, RFS, EQL v2), ``figure4_mapping.png``;
* ``runs.json``: every training's metrics and per-category statistics, the data of the report.

Rows that are the same training (EQL v2 with the paper's defaults appears in four tables) are
trained once per seed. The trainings are independent: they run as Ray tasks on a local Ray
instance bound to 127.0.0.1, one CPU (one torch thread) each, as many at once as
``--parallel`` (default: the machine's CPU count).

Settings that depend on the dataset size are scaled so that they cut at the same training image
counts as on LVIS v1 (100,170 training images): RFS repeats categories seen in fewer than ~100
images (``REPEAT_THRESHOLD = 100.17 / num_train_images``), EQL v1's tail are the categories in
fewer than ~176 images, and the federated loss samples ``C * 50 / 1203`` classes.

Usage::

    python benchmarks/reproduce.py --output output/reproduce          # the default study
    python benchmarks/reproduce.py --smoke --output /tmp/reproduce    # every row, minutes
    python benchmarks/reproduce.py --config-file CFG --iters 2000 --seeds 0 1 2 3 [KEY VALUE ...]

``--config-file`` defaults to the tiny Mask R-CNN on the generated LVIS-format benchmark, and
``--iters`` to its ``SOLVER.MAX_ITER``; ``SOLVER.STEPS`` are scaled with ``--iters``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml"
COLUMNS = ("AP", "APr", "APc", "APf", "APb")
LVIS_TRAIN_IMAGES = 100_170
SMOKE = {
    "iters": 3,
    "seeds": (0, 1),
    "train_images": 100,
    "val_images": 8,
    "opts": ("SOLVER.IMS_PER_BATCH", "2", "TEST.DETECTIONS_PER_IMAGE", "20"),
}

logger = logging.getLogger("reproduce")

# --------------------------------------------------------------------------- the study
EQLV2 = {"LOSS": "eqlv2", "GAMMA": 12.0, "MU": 0.8, "ALPHA": 4.0,
         "USE_AGNOSTIC_TASK": True, "NEG_DOWN_WEIGHT": True, "POS_UP_WEIGHT": True}  # fmt: skip
OBJ_ONLY = {**EQLV2, "NEG_DOWN_WEIGHT": False, "POS_UP_WEIGHT": False}
OBJ_NEG = {**EQLV2, "POS_UP_WEIGHT": False}
TWO_C = {"LOSS": "eqlv2_2c_softmax"}


TABLE_NUMBERS = (1, 2, 7, 8, 9)


def study(numbers: Sequence[int] = TABLE_NUMBERS) -> dict[str, dict[str, dict[str, Any]]]:
    """Table -> row label -> ``MODEL.EQLV2`` keys of the row (plus "RFS": True for the sampler).

    Only the tables whose paper numbers are in ``numbers``.
    """
    tables = {
        "Table 1 analogue: baselines and EQL v2": {
            "softmax CE": {"LOSS": "softmax"},
            "sigmoid BCE": {"LOSS": "sigmoid"},
            "EQL v1": {"LOSS": "eqlv1"},
            "RFS (softmax CE)": {"LOSS": "softmax", "RFS": True},
            "federated loss": {"LOSS": "federated"},
            "EQL v2": EQLV2,
        },
        "Table 2 analogue: ablation of EQL v2": {
            "sigmoid BCE": {"LOSS": "sigmoid"},
            "+ agnostic task": OBJ_ONLY,
            "+ negative down-weighting": OBJ_NEG,
            "+ positive up-weighting (EQL v2)": EQLV2,
        },
        "Table 7 analogue: gamma and mu (alpha 4)": {
            f"gamma {g:g}, mu {m:g}": {**EQLV2, "GAMMA": g, "MU": m}
            for g, m in ((8.0, 0.7), (8.0, 0.8), (10.0, 0.8), (10.0, 0.9), (12.0, 0.8), (12.0, 0.9))
        },
        "Table 8 analogue: alpha (gamma 12, mu 0.8)": {
            f"alpha {a:g}": {**EQLV2, "ALPHA": a} for a in (0.0, 1.0, 2.0, 4.0, 8.0)
        },
        "Table 9 analogue: C-sigmoid vs 2C-softmax": {
            "C-sigmoid, obj": OBJ_ONLY,
            "2C-softmax, obj": {**OBJ_ONLY, **TWO_C},
            "C-sigmoid, obj + neg": OBJ_NEG,
            "2C-softmax, obj + neg": {**OBJ_NEG, **TWO_C},
            "C-sigmoid, obj + neg + pos": EQLV2,
            "2C-softmax, obj + neg + pos": {**EQLV2, **TWO_C},
        },
    }
    return {title: rows for number, (title, rows) in zip(TABLE_NUMBERS, tables.items(), strict=True)
            if number in numbers}  # fmt: skip


def run_key(row: dict[str, Any]) -> str:
    """A stable name of a training setting, equal for equal settings."""
    return ",".join(f"{k}={row[k]}" for k in sorted(row))


# --------------------------------------------------------------------------- one training
@dataclass(frozen=True)
class Job:
    """One training: the row's settings, the seed and everything the Ray task needs."""

    key: str
    row: dict[str, Any]
    seed: int
    config_file: str
    opts: tuple[str, ...]
    iters: int
    output_dir: str
    data: dict[str, Any] = field(default_factory=dict)


def job_opts(job: Job, scaled: dict[str, Any]) -> list[str]:
    """detectron2 ``KEY VALUE`` overrides of a job (after the user's ``opts``)."""
    opts = list(job.opts)
    for key, value in job.row.items():
        if key != "RFS":
            opts += [f"MODEL.EQLV2.{key}", str(value)]
    if job.row.get("RFS"):
        opts += ["DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
                 "DATALOADER.REPEAT_THRESHOLD", str(scaled["repeat_threshold"])]  # fmt: skip
    steps = tuple(max(1, round(job.iters * f)) for f in scaled["step_fractions"])
    opts += ["MODEL.EQLV2.EQLV1_LAMBDA", str(scaled["eqlv1_lambda"]),
             "MODEL.EQLV2.FED_LOSS_NUM_CLASSES", str(scaled["fed_classes"]),
             "SOLVER.MAX_ITER", str(job.iters), "SOLVER.STEPS", str(steps),
             "SOLVER.WARMUP_ITERS", str(min(scaled["warmup"], max(job.iters // 5, 1))),
             "SOLVER.CHECKPOINT_PERIOD", str(10 * job.iters), "TEST.EVAL_PERIOD", "0",
             "SEED", str(job.seed), "OUTPUT_DIR", job.output_dir]  # fmt: skip
    return opts


def register_data(data: dict[str, Any]) -> None:
    """Re-register the generated benchmark at another size (``--smoke``), if asked to."""
    if data:
        from eqlv2.data import register_synthetic
        from eqlv2.data.synthetic_plan import SyntheticSpec

        register_synthetic(data["root"], SyntheticSpec(**data["spec"]))


def train_one(job: Job, scaled: dict[str, Any], ratio_iters: Sequence[int]) -> dict[str, Any]:
    """Train and evaluate one job (in a Ray task); returns its metrics and per-category data."""
    import torch
    from detectron2.engine import HookBase

    from eqlv2.engine import EQLv2Trainer, setup_cfg
    from eqlv2.evaluation import summary
    from eqlv2.losses.statistics import GradientStatistics
    from eqlv2.modeling import EQLv2FastRCNNOutputLayers
    from eqlv2.modeling.roi_heads import classification_losses

    torch.set_num_threads(1)
    cfg = setup_cfg(job.config_file, job_opts(job, scaled))
    register_data(job.data)
    ratios: dict[int, list[float]] = {}

    class RatioRecorder(HookBase):
        def after_step(self) -> None:
            done = self.trainer.iter + 1
            if done in ratio_iters:
                loss = classification_losses(self.trainer.model)[-1]
                ratios[done] = GradientStatistics.from_loss(loss).ratio.tolist()

    started = time.time()
    trainer = EQLv2Trainer(cfg)
    trainer.register_hooks([RatioRecorder()])
    trainer.resume_or_load(resume=False)
    trainer.train()
    # detectron2's EvalHook evaluates after the last iteration even with TEST.EVAL_PERIOD 0 and
    # keeps the results there (DefaultTrainer.train returns them only with EXPECTED_RESULTS).
    results = getattr(trainer, "_last_eval_results", None) or EQLv2Trainer.test(cfg, trainer.model)
    predictor = [m for m in trainer.model.modules() if isinstance(m, EQLv2FastRCNNOutputLayers)][-1]
    for checkpoint in Path(job.output_dir).glob("*.pth"):
        checkpoint.unlink()  # tens of MB per training; the report needs none of them
    return {
        "key": job.key, "seed": job.seed, "metrics": summary(results),
        "ratios": ratios, "weight_norms": predictor.category_weight_norms().tolist(),
        "seconds": time.time() - started,
    }  # fmt: skip


# --------------------------------------------------------------------------- running on Ray
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (Ray's defaults may be taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_local_ray(num_cpus: int, attempts: int = 3) -> None:
    """A new local Ray instance on 127.0.0.1 whose workers import this checkout's ``eqlv2``.

    Retried: on a loaded machine Ray's raylet may give up waiting for its dashboard agent
    (a fixed 15 s wait, ray-project/ray#65983) and ``ray.init`` then fails at startup.
    """
    import ray

    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_port=free_port(),
                     log_to_driver=False, runtime_env={"env_vars": env}, _node_ip_address="127.0.0.1")  # fmt: skip
            return
        except Exception as error:  # Ray raises a bare Exception on startup timeouts
            ray.shutdown()
            if attempt == attempts:
                raise
            logger.warning("Ray did not start (%s); attempt %d of %d", error, attempt + 1, attempts)


def run_jobs(
    jobs: list[Job], scaled: dict[str, Any], ratio_iters: list[int], parallel: int
) -> list[dict]:
    """Run every job as a Ray task on a new local instance (127.0.0.1), ``parallel`` at once."""
    import ray

    start_local_ray(parallel)
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(train_one)
        pending = {task.remote(job, scaled, ratio_iters): job for job in jobs}
        results = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            result = ray.get(done[0])
            results.append(result)
            logger.info("done %d/%d: %s seed %d in %.0f s (AP %.2f)", len(results), len(jobs), job.key,
                        job.seed, result["seconds"], result["metrics"]["AP"])  # fmt: skip
        return results
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- report
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN std for one value); NaN values are dropped."""
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else math.nan


def metric_values(results: list[dict], key: str, column: str) -> list[float]:
    return [r["metrics"][column] for r in results if r["key"] == key]


def format_cell(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def table_markdown(title: str, rows: dict[str, dict], results: list[dict], num_seeds: int) -> str:
    lines = [f"### {title}", "", f"mean ± std over {num_seeds} seed(s)", "",
             "| | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]  # fmt: skip
    for label, row in rows.items():
        cells = [format_cell(metric_values(results, run_key(row), c)) for c in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of a minus mean of b and the standard error of that difference (NaN if < 2 seeds)."""
    if not a or not b:
        return math.nan, math.nan
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    error = math.sqrt(std_a**2 / len(a) + std_b**2 / len(b))
    return mean_a - mean_b, error


def claim_line(
    text: str,
    a: Sequence[float],
    b: Sequence[float],
    unit: str = "AP points",
    no_drop: bool = False,
) -> str:
    """One claim: ``mean(a) - mean(b)`` with its standard error and the 2-standard-error verdict.

    The claim is ``a > b`` beyond 2 standard errors, or with ``no_drop`` that ``a`` is not below
    ``b`` by more than 2 standard errors.
    """
    diff, error = difference(a, b)
    if math.isnan(error) or math.isnan(diff):
        verdict = "cannot be decided (fewer than 2 seeds or no value)"
    elif no_drop:
        verdict = (
            "holds (no drop beyond 2 standard errors)" if diff > -2 * error else "does NOT hold"
        )
    else:
        verdict = (
            "holds beyond 2 standard errors"
            if diff > 2 * error
            else "does NOT hold beyond 2 standard errors"
        )
    amount = f"{diff:+.3f} ± {error:.3f}" + (f" {unit}" if unit else "")
    return f"- {text}: difference {amount} (± one standard error): **{verdict}**."


def tail_ratio_distance(
    results: list[dict], key: str, groups: list[str], last_iter: int
) -> list[float]:
    """Per seed, mean |1 - g_j| over the rare categories at the last iteration."""
    rare = [i for i, g in enumerate(groups) if g == "r"] or list(range(len(groups)))
    return [float(np.mean(np.abs(1.0 - np.asarray(r["ratios"][last_iter])[rare])))
            for r in results if r["key"] == key and last_iter in r["ratios"]]  # fmt: skip


def claims_markdown(results: list[dict], groups: list[str], last_iter: int) -> str:
    eqlv2, sigmoid, softmax = (
        run_key(EQLV2),
        run_key({"LOSS": "sigmoid"}),
        run_key({"LOSS": "softmax"}),
    )
    best_baseline = max(
        (sigmoid, softmax), key=lambda k: mean_std(metric_values(results, k, "APr"))[0]
    )
    alpha0 = run_key({**EQLV2, "ALPHA": 0.0})
    return "\n".join([
        "### The paper's claims on this benchmark", "",
        claim_line("EQL v2 APr above the better of sigmoid / softmax APr",
                   metric_values(results, eqlv2, "APr"), metric_values(results, best_baseline, "APr")),
        claim_line("EQL v2 does not lower APf much against the same baseline",
                   metric_values(results, eqlv2, "APf"), metric_values(results, best_baseline, "APf"),
                   no_drop=True),
        claim_line("positive up-weighting helps rare categories: APr at alpha 4 above alpha 0",
                   metric_values(results, eqlv2, "APr"), metric_values(results, alpha0, "APr")),
        claim_line("EQL v2's rare-category gradient ratio closer to 1 than softmax CE's "
                   "(mean |1 - g| of softmax minus EQL v2's)",
                   tail_ratio_distance(results, softmax, groups, last_iter),
                   tail_ratio_distance(results, eqlv2, groups, last_iter), unit="(ratio units)"),
        "", "If a claim does not hold, look at the schedule (``--iters``), the benchmark's "
        "difficulty and the seed spread before concluding; do not tune the benchmark until it holds.",
    ])  # fmt: skip


# --------------------------------------------------------------------------- figures
def seed_mean(results: list[dict], key: str, pick) -> np.ndarray | None:
    """Mean over the seeds of ``pick(result)`` for the runs of ``key`` (None if there are none)."""
    values = [np.asarray(pick(r), dtype=float) for r in results if r["key"] == key]
    return np.mean(values, axis=0) if values else None


def write_figures(
    results: list[dict], counts: list[int], groups: list[str], ratio_iters: list[int], output: Path
) -> list[Path]:
    """Figures 1/2, 3 and 4 as PNGs in ``output``."""
    from eqlv2.paper_figures import plot_gradient_ratios, plot_mapping_functions, plot_weight_norms

    losses = {"softmax CE": {"LOSS": "softmax"}, "EQL v1": {"LOSS": "eqlv1"}, "EQL v2": EQLV2}
    panels = {}
    for iteration in ratio_iters:
        curves = {label: seed_mean(results, run_key(row), lambda r, i=iteration: r["ratios"][i])
                  for label, row in losses.items()}  # fmt: skip
        panels[f"iteration {iteration}"] = {k: v for k, v in curves.items() if v is not None}
    models = {
        "softmax CE": {"LOSS": "softmax"},
        "RFS": {"LOSS": "softmax", "RFS": True},
        "EQL v2": EQLV2,
    }
    norms = {
        label: seed_mean(results, run_key(row), lambda r: r["weight_norms"])
        for label, row in models.items()
    }
    paths = [output / "figure1_2_gradient_ratio.png", output / "figure3_weight_norms.png",
             output / "figure4_mapping.png"]  # fmt: skip
    written = [plot_mapping_functions(paths[2]) and paths[2]]
    if all(panels.values()):  # the tables run include the losses of the figure
        written.append(plot_gradient_ratios(panels, counts, paths[0], groups=groups) and paths[0])
    norms = {k: v for k, v in norms.items() if v is not None}
    if norms:
        written.append(plot_weight_norms(norms, counts, paths[1], groups=groups) and paths[1])
    return sorted(written)


def write_report(
    results: list[dict], tables: dict, info: dict[str, Any], figures: list[Path], output: Path
) -> Path:
    """``report.md``: the command, the tables, the claims and the figures."""
    sections = [
        "# EQL v2 reproduction report", "",
        f"Command: `{info['command']}`", "",
        f"Config `{info['config_file']}`, {info['iters']} iterations, seeds {info['seeds']}, "
        f"{info['num_trainings']} trainings in {info['minutes']:.1f} min wall clock. "
        "AP columns are the LVIS evaluator's (mask AP when the model has masks, APb box AP).", "",
    ]  # fmt: skip
    for title, rows in tables.items():
        sections += [table_markdown(title, rows, results, len(info["seeds"])), ""]
    sections += [claims_markdown(results, info["groups"], info["ratio_iters"][-1]), ""]
    sections += ["### Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    path = output / "report.md"
    path.write_text("\n".join(sections) + "\n")
    return path


# --------------------------------------------------------------------------- MLflow
def check_tracking_uri(uri: str) -> str:
    """``uri`` unless it carries a user name or password (those come from the environment)."""
    from urllib.parse import urlsplit

    if urlsplit(uri).password is not None or "@" in urlsplit(uri).netloc:
        raise argparse.ArgumentTypeError("--mlflow-uri must not contain credentials; set MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD in the environment instead")  # fmt: skip
    return uri


def log_to_mlflow(
    uri: str,
    experiment: str,
    results: list[dict],
    settings: dict[str, dict],
    info: dict[str, Any],
    output: Path,
) -> str:
    """One parent run (the report, figures and runs.json as artifacts) and a child run per
    training (the row's settings and seed as params, AP .. APb as metrics); returns the parent's id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    parent = client.create_run(
        experiment_id, run_name="reproduce", tags={"kind": "eqlv2-reproduce"}
    )
    parent_id = parent.info.run_id
    for name in ("command", "config_file", "iters", "seeds"):
        client.log_param(parent_id, name, str(info[name]))
    for result in results:
        child = client.create_run(experiment_id, run_name=f"{result['key']} seed {result['seed']}",
                                  tags={"mlflow.parentRunId": parent_id})  # fmt: skip
        params = {
            **{f"setting/{k}": str(v) for k, v in settings[result["key"]].items()},
            "seed": str(result["seed"]),
        }
        for name, value in params.items():
            client.log_param(child.info.run_id, name, value)
        for name, value in result["metrics"].items():
            if not math.isnan(value):
                client.log_metric(child.info.run_id, name, value)
        client.set_terminated(child.info.run_id)
    for path in sorted(output.glob("*.png")) + [output / "report.md", output / "runs.json"]:
        client.log_artifact(parent_id, str(path))
    client.set_terminated(parent_id)
    return parent_id


# --------------------------------------------------------------------------- driver
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-file", default=str(DEFAULT_CONFIG), help="detectron2 YAML of every run"
    )
    parser.add_argument(
        "--iters", type=int, default=None, help="iterations per run (default: SOLVER.MAX_ITER)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every row"
    )
    parser.add_argument(
        "--output", default="output/reproduce", help="folder of the report and figures"
    )
    parser.add_argument(
        "--parallel", type=int, default=os.cpu_count() or 1, help="trainings at once"
    )
    parser.add_argument(
        "--mlflow-uri",
        default=None,
        type=check_tracking_uri,
        help="also log to this MLflow tracking URI: a parent run and a child run per training",
    )
    parser.add_argument(
        "--mlflow-experiment", default="eqlv2-reproduce", help="MLflow experiment name"
    )
    parser.add_argument(
        "--tables",
        type=int,
        nargs="+",
        choices=TABLE_NUMBERS,
        default=list(TABLE_NUMBERS),
        help="the paper's tables to reproduce (default: all)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"every row and figure in minutes: {SMOKE['iters']} iterations, seeds "
        f"{SMOKE['seeds']}, a {SMOKE['train_images']}/{SMOKE['val_images']}-image "
        f"benchmark, overrides {' '.join(SMOKE['opts'])}",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every run"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.iters, args.seeds = SMOKE["iters"], list(SMOKE["seeds"])
        args.opts = [*SMOKE["opts"], *args.opts]
    if args.iters is not None and args.iters < 1:
        parser.error(f"--iters must be >= 1, got {args.iters}")
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    return args


def prepare(args: argparse.Namespace, output: Path) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Check the config (fast, before any training), generate the data; returns the scaled
    settings, the benchmark override (``--smoke``) and the training set's statistics."""
    from detectron2.data import DatasetCatalog

    from eqlv2.data import category_statistics
    from eqlv2.engine import setup_cfg

    cfg = setup_cfg(args.config_file, args.opts)
    data: dict[str, Any] = {}
    if args.smoke:
        data = {"root": str(output / "smoke_benchmark"),
                "spec": {"num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                         "num_train_images": SMOKE["train_images"], "num_val_images": SMOKE["val_images"]}}  # fmt: skip
        register_data(data)
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        DatasetCatalog.get(name)  # generates the benchmark once, before the parallel trainings
    stats = category_statistics(cfg.DATASETS.TRAIN[0])
    max_iter = cfg.SOLVER.MAX_ITER
    scaled = {
        "repeat_threshold": min(1.0, LVIS_TRAIN_IMAGES * 1e-3 / stats.num_images),
        "eqlv1_lambda": min(1.0, LVIS_TRAIN_IMAGES * 1.76e-3 / stats.num_images),
        "fed_classes": max(1, round(stats.num_classes * 50 / 1203)),
        "step_fractions": tuple(step / max_iter for step in cfg.SOLVER.STEPS if step < max_iter),
        "warmup": cfg.SOLVER.WARMUP_ITERS,
    }
    if args.iters is None:
        args.iters = max_iter
    return scaled, data, stats


def make_jobs(
    args: argparse.Namespace, tables: dict, data: dict[str, Any], output: Path
) -> list[Job]:
    rows = {run_key(row): row for table in tables.values() for row in table.values()}
    config_file = str(Path(args.config_file).resolve())
    return [
        Job(
            key,
            row,
            seed,
            config_file,
            tuple(args.opts),
            args.iters,
            str(output / "runs" / f"{index:02d}_seed{seed}"),
            data,
        )  # fmt: skip
        for index, (key, row) in enumerate(sorted(rows.items()))
        for seed in args.seeds
    ]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    scaled, data, stats = prepare(args, output)
    tables = study(args.tables)
    jobs = make_jobs(args, tables, data, output)
    ratio_iters = sorted({max(1, args.iters // 3), max(1, 2 * args.iters // 3), args.iters})
    logger.info(
        "%d trainings (%d settings x %d seeds), %d iterations each, %d at once",
        len(jobs),
        len(jobs) // len(args.seeds),
        len(args.seeds),
        args.iters,
        args.parallel,
    )
    results = run_jobs(jobs, scaled, ratio_iters, min(args.parallel, len(jobs)))
    counts = list(stats.instance_counts or stats.image_counts)
    groups = list(stats.frequency_groups)
    settings = {job.key: job.row for job in jobs}
    (output / "runs.json").write_text(
        json.dumps({"results": results, "counts": counts, "groups": groups, "settings": settings})
    )
    figures = write_figures(results, counts, groups, ratio_iters, output)
    info = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "config_file": args.config_file, "iters": args.iters, "seeds": args.seeds,
            "num_trainings": len(jobs), "minutes": (time.time() - started) / 60, "groups": groups,
            "ratio_iters": ratio_iters}  # fmt: skip
    report = write_report(results, tables, info, figures, output)
    logger.info("report: %s", report)
    if args.mlflow_uri:
        run_id = log_to_mlflow(
            args.mlflow_uri, args.mlflow_experiment, results, settings, info, output
        )
        logger.info("MLflow parent run %s", run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
