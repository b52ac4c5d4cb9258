"""End to end: train the tiny config on generated images, resume, evaluate (all on the CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from eqlv2.engine import EQLv2Trainer, setup_cfg
from eqlv2.modeling.roi_heads import classification_losses

TINY = "configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml"


def handful_opts(handful_lvis, output_dir, max_iter):
    return [
        "DATASETS.TRAIN", f"('{handful_lvis['train']}',)",
        "DATASETS.TEST", f"('{handful_lvis['val']}',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "4",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", "3",
        "SOLVER.WARMUP_ITERS", "2",
        "TEST.EVAL_PERIOD", "0",
        "MODEL.EQLV2.LOG_PERIOD", "2",
        "INPUT.MIN_SIZE_TRAIN", "(96,)",
        "INPUT.MIN_SIZE_TEST", "96",
        "OUTPUT_DIR", str(output_dir),
        "MODEL.EQLV2.BASE_CHECKPOINT_CONFIG", "",
    ]  # fmt: skip


def test_max_images_loads_the_first_images_of_the_test_set(handful_lvis, tmp_path):
    from detectron2.data import DatasetCatalog

    every = [record["image_id"] for record in DatasetCatalog.get(handful_lvis["val"])]
    for limit, expected in (("4", every[:4]), ("0", every), ("99", every)):
        cfg = setup_cfg(TINY, [*handful_opts(handful_lvis, tmp_path, max_iter=1), "TEST.EQLV2.MAX_IMAGES", limit])
        loaded = [record["image_id"] for batch in EQLv2Trainer.build_test_loader(cfg, handful_lvis["val"]) for record in batch]
        assert loaded == expected, limit
    assert len(every) == 6


@pytest.mark.slow
def test_train_resume_and_evaluate(handful_lvis, tmp_path):
    torch.manual_seed(0)
    cfg = setup_cfg(TINY, handful_opts(handful_lvis, tmp_path, max_iter=3))
    trainer = EQLv2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    (loss,) = classification_losses(trainer.model)
    first_pos, first_neg = loss.pos_grad.clone(), loss.neg_grad.clone()
    assert int(loss.num_updates) == 3 and first_neg.sum() > 0
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"

    # Resume to 5 iterations: starts at iteration 3 with the statistics of the checkpoint.
    cfg = setup_cfg(TINY, handful_opts(handful_lvis, tmp_path, max_iter=5))
    resumed = EQLv2Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    (resumed_loss,) = classification_losses(resumed.model)
    assert torch.equal(resumed_loss.pos_grad, first_pos) and torch.equal(resumed_loss.neg_grad, first_neg)
    resumed.train()
    assert int(resumed_loss.num_updates) == 5
    assert torch.all(resumed_loss.neg_grad >= first_neg) and not torch.equal(resumed_loss.neg_grad, first_neg)

    results = EQLv2Trainer.test(cfg, resumed.model)
    assert set(results["bbox"]) >= {"AP", "APr", "APc", "APf"}
    assert set(results["segm"]) >= {"AP", "APr", "APc", "APf"}
    # TEST.EQLV2.EVALUATE_MASKS False: the same boxes, no mask inference, the mask head back after.
    boxes_only = setup_cfg(TINY, [*handful_opts(handful_lvis, tmp_path, max_iter=5), "TEST.EQLV2.EVALUATE_MASKS", "False"])
    box_results = EQLv2Trainer.test(boxes_only, resumed.model)
    assert set(box_results) == {"bbox"} and box_results["bbox"] == pytest.approx(results["bbox"], nan_ok=True)
    assert resumed.model.roi_heads.mask_on
    metrics = (tmp_path / "metrics.json").read_text()
    assert "eqlv2/ratio_mean" in metrics and "loss_cls" in metrics


@pytest.mark.slow
def test_train_net_cli_eval_only_names_unreadable_weights(handful_lvis, tmp_path):
    """``--eval-only`` with a missing weights file fails with a message that names the file."""
    missing = tmp_path / "nowhere" / "model.pth"
    script = (
        "import sys; sys.argv = sys.argv[:1] + sys.argv[2:]\n"
        "sys.path.insert(0, 'tests'); from conftest import write_handful_lvis\n"
        "from pathlib import Path; import os\n"
        "from eqlv2.data.lvis import register_lvis_json\n"
        f"j, r = write_handful_lvis(Path({str(tmp_path)!r}), 'val', 2, 0)\n"
        f"register_lvis_json({handful_lvis['val']!r}, str(j), str(r))\n"
        f"register_lvis_json({handful_lvis['train']!r}, str(j), str(r))\n"
        "import runpy; runpy.run_path('train/train_net.py', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "x", "--config-file", TINY, "--eval-only",
         *handful_opts(handful_lvis, tmp_path, 1), "MODEL.WEIGHTS", str(missing)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert str(missing) in proc.stderr


def test_missing_config_file_is_named():
    with pytest.raises(FileNotFoundError, match="configs/none.yaml"):
        setup_cfg("configs/none.yaml")


def test_unknown_override_key_is_named():
    with pytest.raises(ValueError, match="MODEL.EQLV2.GAMA"):
        setup_cfg(TINY, ["MODEL.EQLV2.GAMA", "3"])
