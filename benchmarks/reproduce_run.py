"""One training of ``benchmarks/reproduce.py``: train, evaluate, collect the figures' data.

Kept apart from the report script so that it can be imported by name in Ray workers and in the
processes detectron2's ``launch`` starts for a multi-GPU training (``--full``): both need this
module on ``PYTHONPATH`` (the report script puts ``benchmarks/`` there).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Job", "job_opts", "register_data", "train_one"]


@dataclass(frozen=True)
class Job:
    """One training: the row's settings, the seed and everything the Ray task needs.

    ``processes`` > 1 trains with detectron2's ``launch`` (one process per GPU, or gloo on a CPU).
    """

    key: str
    row: dict[str, Any]
    seed: int
    config_file: str
    opts: tuple[str, ...]
    iters: int
    output_dir: str
    data: dict[str, Any] = field(default_factory=dict)
    processes: int = 1
    label: str = ""  #: what the progress lines call it, e.g. "Table 8 alpha 2"


def job_opts(job: Job, scaled: dict[str, Any]) -> list[str]:
    """detectron2 ``KEY VALUE`` overrides of a job (after the study's ``opts``)."""
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


def final_evaluation(storage, test_datasets: Sequence[str]) -> dict[str, Any]:
    """The last results detectron2's ``EvalHook`` put into the trainer's ``EventStorage``."""
    from eqlv2.raytrain.report_hook import evaluation_at, is_evaluation_key

    times = [at for key, (_, at) in storage.latest().items() if is_evaluation_key(key, test_datasets)]
    if not times:
        raise RuntimeError("the training ended without an evaluation (is DATASETS.TEST empty?)")
    return evaluation_at(storage, max(times), test_datasets)


def _train(job: Job, scaled: dict[str, Any], ratio_iters: Sequence[int]) -> dict[str, Any] | None:
    """Train and evaluate ``job`` in this process (one rank of it); returns its metrics, the
    gradient ratios at ``ratio_iters`` and the classifier's weight norms (None on ranks > 0)."""
    import torch
    from detectron2.engine import HookBase
    from detectron2.utils import comm

    from eqlv2.engine import EQLv2Trainer, setup_cfg
    from eqlv2.evaluation import summary
    from eqlv2.losses.statistics import GradientStatistics
    from eqlv2.modeling import EQLv2FastRCNNOutputLayers
    from eqlv2.modeling.roi_heads import classification_losses

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
    if not comm.is_main_process():
        return None  # detectron2's EvalHook puts the evaluation into rank 0's storage only
    results = final_evaluation(trainer.storage, cfg.DATASETS.TEST)
    predictor = [m for m in trainer.model.modules() if isinstance(m, EQLv2FastRCNNOutputLayers)][-1]
    with torch.no_grad():
        norms = predictor.category_weight_norms().tolist()
    return {
        "key": job.key, "seed": job.seed, "metrics": summary(results),
        "ratios": ratios, "weight_norms": norms, "seconds": time.time() - started,
    }  # fmt: skip


def _launched_rank(job: Job, scaled: dict[str, Any], ratio_iters: Sequence[int], result_file: str) -> None:
    """One process of a ``launch``-ed training; rank 0 writes the result to ``result_file``."""
    from eqlv2.raytrain.distributed import ddp_device_ids_fix

    with ddp_device_ids_fix():  # detectron2's DDP wrapper passes GPU device_ids, also for a CPU model
        result = _train(job, scaled, ratio_iters)
    if result is not None:
        Path(result_file).write_text(json.dumps(result))


def train_one(job: Job, scaled: dict[str, Any], ratio_iters: Sequence[int]) -> dict[str, Any]:
    """Train and evaluate one job (in a Ray task); returns its metrics and per-category data.

    With ``job.processes`` > 1 the training runs in that many processes started by detectron2's
    ``launch`` (NCCL on GPUs, gloo on a CPU), initialised through a file in the job's folder so
    that nothing listens on a port.
    """
    import torch
    from detectron2.engine import launch

    if job.processes == 1:
        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # one CPU per Ray task
        result = _train(job, scaled, ratio_iters)
    else:
        folder = Path(job.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        result_file, init_file = folder / "result.json", folder / "dist_init"
        init_file.unlink(missing_ok=True)
        launch(_launched_rank, job.processes, dist_url=f"file://{init_file}",
               args=(job, scaled, list(ratio_iters), str(result_file)))  # fmt: skip
        result = json.loads(result_file.read_text())
        result["ratios"] = {int(k): v for k, v in result["ratios"].items()}
    for checkpoint in Path(job.output_dir).glob("*.pth"):
        checkpoint.unlink()  # tens of MB per training; the report needs none of them
    return result
