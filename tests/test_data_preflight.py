"""Every dataset file a run will read is checked before training starts, naming the file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import write_handful_lvis
from detectron2.config import get_cfg

from eqlv2.config import add_eqlv2_config
from eqlv2.data import DatasetFormatError, register_lvis_json, register_openimages
from eqlv2.data.preflight import check_dataset_files
from eqlv2.data.synthetic import generate_synthetic
from eqlv2.data.synthetic_plan import SyntheticSpec
from eqlv2.engine import EQLv2Trainer, setup_cfg

TINY = "configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml"


@pytest.fixture()
def lvis(tmp_path, cleanup_names):
    """A handful LVIS train / val pair registered as preflight_{train,val}: name -> json file."""
    files = {}
    for split, count, seed in (("train", 6, 0), ("val", 4, 1)):
        json_file, image_root = write_handful_lvis(tmp_path, split, count, seed)
        register_lvis_json(f"preflight_{split}", str(json_file), str(image_root))
        cleanup_names.append(f"preflight_{split}")
        files[split] = json_file
    return files


def _cfg(train=("preflight_train",), test=("preflight_val",)):
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train), tuple(test)
    return cfg


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_intact_files_pass(lvis):
    assert check_dataset_files(_cfg()) == [str(lvis["train"]), str(lvis["val"])]


def test_truncated_validation_json_is_named(lvis):
    _truncate(lvis["val"])
    with pytest.raises(DatasetFormatError, match=r"lvis_v1_val.json: not valid JSON"):
        check_dataset_files(_cfg())


def test_truncated_training_json_is_named(lvis):
    _truncate(lvis["train"])
    with pytest.raises(DatasetFormatError, match=r"lvis_v1_train.json: does not end like a JSON"):
        check_dataset_files(_cfg())


def test_missing_file_and_unknown_dataset_are_named(lvis):
    os.remove(lvis["val"])
    with pytest.raises(
        FileNotFoundError, match=r"preflight_val: file not found: .*lvis_v1_val.json"
    ):
        check_dataset_files(_cfg())
    with pytest.raises(KeyError, match=r"DATASETS.TEST: dataset 'nope' is not registered"):
        check_dataset_files(_cfg(test=("nope",)))


@pytest.fixture()
def openimages(tmp_path, cleanup_names):
    spec = SyntheticSpec(num_classes=6, seed=11, num_train_images=8, num_val_images=4)
    root = generate_synthetic(tmp_path / "openimages", "openimages", spec)
    for split in ("train", "val"):
        register_openimages(f"preflight_oi_{split}", root, split)
        cleanup_names.append(f"preflight_oi_{split}")
    return root


@pytest.mark.parametrize("split", ["train", "validation"])
def test_truncated_openimages_csv_is_named(openimages, split):
    cfg = _cfg(train=("preflight_oi_train",), test=("preflight_oi_val",))
    assert len(check_dataset_files(cfg)) == 8
    path = Path(openimages) / f"challenge-2019-{split}-detection-bbox.csv"
    text = path.read_text()
    path.write_text(text[: text.rindex(",", 0, len(text) - 5)])  # cut in the middle of a row
    with pytest.raises(
        DatasetFormatError, match=rf"challenge-2019-{split}-detection-bbox.csv: .*fields"
    ):
        check_dataset_files(cfg)


def test_trainer_reports_a_truncated_validation_json_before_building(lvis, tmp_path):
    _truncate(lvis["val"])
    # Building the training loader would fail on the missing training images: the error about
    # the validation JSON shows that the check runs first.
    shutil.rmtree(tmp_path / "images" / "train")
    opts = [
        "DATASETS.TRAIN", "('preflight_train',)", "DATASETS.TEST", "('preflight_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "4", "OUTPUT_DIR", str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.raises(DatasetFormatError, match="lvis_v1_val.json: not valid JSON"):
        EQLv2Trainer(setup_cfg(TINY, opts))
