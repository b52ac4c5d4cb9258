"""The base checkpoint: trained once, reused, re-keyed when its inputs change, loaded into a model.

Real detectron2 trainings of the tiny model on the handful of generated images (a few iterations
at 96 px), in the child process :func:`ensure_base_checkpoint` starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from detectron2.modeling import build_model
from ray_fixtures import write_handful

from eqlv2.engine import EQLv2Trainer, setup_cfg
from eqlv2.engine.base_checkpoint import (
    MARKER_FILE,
    BaseCheckpointError,
    base_config_file,
    ensure_base_checkpoint,
    load_base_weights,
)
from eqlv2.engine.trainer import class_agnostic

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml")
BASE = str(ROOT / "configs/tiny/base_agnostic_synthetic.yaml")
SMALL = {
    "SOLVER.IMS_PER_BATCH": "2",
    "SOLVER.MAX_ITER": "2",
    "SOLVER.STEPS": "(1,)",
    "SOLVER.WARMUP_ITERS": "1",
    "INPUT.MIN_SIZE_TRAIN": "(96,)",
    "INPUT.MAX_SIZE_TRAIN": "96",
    "INPUT.MIN_SIZE_TEST": "96",
    "INPUT.MAX_SIZE_TEST": "96",
}


def _write_base_config(tmp_path: Path, data: dict[str, str], **changes: str) -> Path:
    """The project's base config on the handful, a couple of iterations, cached under tmp_path.

    Values are strings that detectron2 decodes as it does ``KEY VALUE`` overrides.
    """
    flat = {
        **data,
        "DATASETS.TRAIN": "('handful_train',)",
        "DATASETS.EQLV2.SYNTHETIC_ROOT": str(tmp_path / "bench"),
        **SMALL,
        **changes,
    }
    tree: dict = {"_BASE_": BASE}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / f"base_{len(list(tmp_path.glob('base_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _model_cfg(tmp_path: Path, data: dict[str, str], base: Path, *extra: str):
    opts = [item for pair in data.items() for item in pair]
    opts += [item for pair in SMALL.items() for item in pair]
    opts += [
        "DATASETS.TRAIN", "('handful_train',)", "DATASETS.TEST", "('handful_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "4", "MODEL.EQLV2.BASE_CHECKPOINT_CONFIG", str(base),
        "DATASETS.EQLV2.SYNTHETIC_ROOT", str(tmp_path / "bench"), "OUTPUT_DIR", str(tmp_path / "out"),
        *extra,
    ]  # fmt: skip
    return setup_cfg(TINY, opts)


@pytest.mark.slow
def test_built_once_reused_and_rebuilt_when_its_inputs_change(tmp_path):
    data = write_handful(tmp_path / "handful")
    base = _write_base_config(tmp_path, data)
    cfg = _model_cfg(tmp_path, data, base)

    first = Path(ensure_base_checkpoint(cfg))
    assert first.is_file() and first.parent.parent == tmp_path / "bench" / "base_checkpoints"
    marker = json.loads((first.parent / MARKER_FILE).read_text())
    assert marker["inputs"]["versions"]["torch"] == torch.__version__
    assert "handful_train" in marker["inputs"]["datasets"]
    stamp = first.stat().st_mtime_ns

    # Reused: same file, not rewritten, and no leftover temporary folder.
    assert Path(ensure_base_checkpoint(cfg)) == first and first.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in first.parent.parent.iterdir() if not p.name.endswith(".lock")) == [first.parent.name]

    # Another input (the base's learning rate) is another key: trained anew, the first one kept.
    changed = _write_base_config(tmp_path, data, **{"SOLVER.BASE_LR": "0.01"})
    second = Path(ensure_base_checkpoint(_model_cfg(tmp_path, data, changed)))
    assert second.parent != first.parent and second.is_file() and first.stat().st_mtime_ns == stamp

    # The trainer starts from it: backbone copied, class-agnostic box regression copied to every class.
    trainer = EQLv2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    state = torch.load(first, map_location="cpu", weights_only=True)["model"]
    model = trainer.model.state_dict()
    key = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(model[key], state[key])
    bbox = state["roi_heads.box_predictor.bbox_pred.weight"]
    assert bbox.shape[0] == 4 and torch.equal(model["roi_heads.box_predictor.bbox_pred.weight"], bbox.repeat(4, 1))
    assert not any("cls_score" in k or "classification_loss" in k for k in state)


def test_load_tiles_class_agnostic_predictors_and_rejects_other_architectures(tmp_path):
    base_cfg = setup_cfg(TINY, ["MODEL.ROI_HEADS.NUM_CLASSES", "1"])
    torch.manual_seed(0)
    base = build_model(base_cfg)
    state = {k: v for k, v in base.state_dict().items() if "cls_score" not in k and "classification_loss" not in k}
    path = tmp_path / "base.pth"
    torch.save({"model": state}, path)

    model = build_model(setup_cfg(TINY, ["MODEL.ROI_HEADS.NUM_CLASSES", "3"]))
    fresh_cls = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    load_base_weights(model, str(path))
    mask = model.roi_heads.mask_head.predictor.weight
    assert mask.shape[0] == 3 and all(torch.equal(mask[i], state["roi_heads.mask_head.predictor.weight"][0]) for i in range(3))
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, fresh_cls)

    faster = build_model(setup_cfg(TINY, ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.MASK_ON", "False"]))
    load_base_weights(faster, str(path))  # the base's mask head is simply not used

    other = build_model(setup_cfg(TINY, ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.FPN.OUT_CHANNELS", "32"]))
    with pytest.raises(BaseCheckpointError, match=r"backbone\.fpn.*same architecture"):
        load_base_weights(other, str(path))
    with pytest.raises(BaseCheckpointError, match="cannot read the base checkpoint"):
        load_base_weights(other, str(tmp_path / "missing.pth"))


def test_missing_base_config_is_named(tmp_path, monkeypatch):
    cfg = setup_cfg(TINY, ["MODEL.EQLV2.BASE_CHECKPOINT_CONFIG", "configs/tiny/none.yaml"])
    with pytest.raises(FileNotFoundError, match="configs/tiny/none.yaml"):
        base_config_file(cfg)
    assert base_config_file(setup_cfg(TINY, ["MODEL.EQLV2.BASE_CHECKPOINT_CONFIG", ""])) is None
    # A relative path is found from the repository, whatever the working directory.
    monkeypatch.chdir(tmp_path)
    cfg = setup_cfg(TINY)
    assert base_config_file(cfg) == ROOT / cfg.MODEL.EQLV2.BASE_CHECKPOINT_CONFIG


def test_class_agnostic_relabels_every_annotation_and_needs_one_class():
    records = [{"file_name": "a.jpg", "annotations": [{"category_id": 3}, {"category_id": 0}]}, {"file_name": "b.jpg"}]
    out = class_agnostic(records)
    assert [a["category_id"] for a in out[0]["annotations"]] == [0, 0] and out[1]["annotations"] == []
    assert records[0]["annotations"][0]["category_id"] == 3  # the input is left as it was
    cfg = setup_cfg(TINY, ["DATASETS.EQLV2.CLASS_AGNOSTIC", "True"])
    with pytest.raises(ValueError, match="NUM_CLASSES 1"):
        EQLv2Trainer.build_train_loader(cfg)
