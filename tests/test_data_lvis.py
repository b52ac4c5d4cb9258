"""LVIS v1 registration, a user's LVIS JSON, and the category statistics of any dataset."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from eqlv2.config import add_eqlv2_config
from eqlv2.data import category_statistics, register_from_config, register_lvis_json
from eqlv2.data.builtin import register_synthetic, synthetic_root
from eqlv2.data.frequency import CategoryStatistics, frequency_group
from eqlv2.data.lvis import (
    LVIS_V1_TRAIN_NUM_IMAGES,
    datasets_root,
    register_builtin_lvis,
)

#: (LVIS category id, name, training images); the ids are deliberately not 1..C.
CATEGORIES = [(3, "apple", 2), (7, "boat", 12), (9, "cat", 0)]


def write_lvis(root: Path, split: str = "train", frequency: dict[int, str] | None = None,
               counts: bool = True) -> Path:  # fmt: skip
    """Three 40x30 images with a few boxes; returns the JSON (images under root/<split>2017)."""
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in (1, 2, 3):
        file_name = f"{image_id:012d}.jpg"
        Image.new("RGB", (40, 30), (90, 90, 90)).save(folder / file_name)
        images.append(
            {
                "id": image_id,
                "width": 40,
                "height": 30,
                "coco_url": f"http://images.cocodataset.org/{split}2017/{file_name}",
                "neg_category_ids": [9],
                "not_exhaustive_category_ids": [7] if image_id == 2 else [],
            }
        )
    for image_id, category_id in ((1, 3), (1, 7), (2, 7), (2, 7), (3, 3)):
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [2.0, 3.0, 10.0, 8.0],
                "area": 80.0,
                "segmentation": [[2.0, 3.0, 12.0, 3.0, 12.0, 11.0, 2.0, 11.0]],
            }
        )
    categories = []
    for cid, name, image_count in CATEGORIES:
        category = {
            "id": cid,
            "name": name,
            "synonyms": [name, f"{name}_2"],
            "def": name,
            "synset": f"{name}.n.01",
        }
        if counts:
            category.update(image_count=image_count, instance_count=2 * image_count)
        if frequency is not None:
            category["frequency"] = frequency[cid]
        categories.append(category)
    path = root / f"lvis_v1_{split}.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def test_frequency_group_thresholds():
    assert [frequency_group(n) for n in (0, 1, 10, 11, 100, 101, 5000)] == list("rrrccff")


def test_builtin_lvis_v1_keeps_detectron2_registration_and_adds_metadata():
    register_builtin_lvis()  # a second call (the first ran on import) changes nothing
    for name in ("lvis_v1_train", "lvis_v1_val"):
        assert name in DatasetCatalog
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "lvis"
        assert meta.json_file == os.path.join(datasets_root(), f"lvis/{name}.json")
        assert meta.image_root == os.path.join(datasets_root(), "coco/")
        assert len(meta.thing_classes) == len(meta.category_image_counts) == 1203
        assert meta.num_train_images == LVIS_V1_TRAIN_NUM_IMAGES
    stats = category_statistics("lvis_v1_val")
    assert stats.group_sizes() == {"r": 337, "c": 461, "f": 405}
    assert stats.instance_counts is None
    assert all(
        frequency_group(n) == g
        for n, g in zip(stats.image_counts, stats.frequency_groups, strict=True)
    )
    assert stats.class_names[0] == "aerosol_can"


def test_user_json_with_sparse_category_ids(tmp_path, cleanup_names):
    json_file = write_lvis(tmp_path)
    cleanup_names.append("mine_train")
    register_lvis_json("mine_train", json_file, tmp_path)  # no trailing separator
    meta = MetadataCatalog.get("mine_train")
    assert meta.thing_classes == ["apple", "boat", "cat"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 9: 2}
    assert meta.image_root.endswith(os.sep) and meta.evaluator_type == "lvis"
    assert meta.frequency_groups == ["r", "c", "r"]
    assert meta.category_image_counts == [2, 12, 0]
    assert meta.class_image_count[1] == {"id": 2, "image_count": 12}

    dicts = DatasetCatalog.get("mine_train")
    assert [d["image_id"] for d in dicts] == [1, 2, 3]
    assert dicts[0]["file_name"] == str(tmp_path / "train2017" / "000000000001.jpg")
    assert [a["category_id"] for a in dicts[0]["annotations"]] == [0, 1]
    assert dicts[1]["neg_category_ids"] == [9] and dicts[1]["not_exhaustive_category_ids"] == [7]
    assert dicts[0]["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS

    stats = category_statistics("mine_train")
    assert isinstance(stats, CategoryStatistics)
    assert stats.image_counts == (2, 12, 0) and stats.instance_counts == (4, 24, 0)
    assert stats.num_images == 3 and stats.group_indices("c") == [1]
    assert stats.image_frequencies[0] == pytest.approx(2 / 3)


def test_counts_from_annotations_when_categories_lack_them(tmp_path, cleanup_names):
    json_file = write_lvis(tmp_path, counts=False)
    cleanup_names.append("nocounts_train")
    register_lvis_json("nocounts_train", json_file, tmp_path)
    stats = category_statistics("nocounts_train")
    assert stats.image_counts == (2, 2, 0) and stats.instance_counts == (2, 3, 0)


def test_frequency_field_is_used_and_checked(tmp_path, cleanup_names, caplog):
    json_file = write_lvis(tmp_path, frequency={3: "r", 7: "f", 9: "r"})
    cleanup_names.append("freq_train")
    with caplog.at_level(logging.WARNING, logger="eqlv2.data.lvis"):
        register_lvis_json("freq_train", json_file, tmp_path)
    assert MetadataCatalog.get("freq_train").frequency_groups == ["r", "f", "r"]
    assert "disagrees" in caplog.text and "boat (f but c)" in caplog.text


def test_val_split_takes_statistics_of_train_json(tmp_path, cleanup_names):
    train = write_lvis(tmp_path / "t", "train")
    val = write_lvis(tmp_path / "v", "val", counts=False)
    cleanup_names.append("split_val")
    register_lvis_json("split_val", val, tmp_path / "v", train_json_file=train)
    assert category_statistics("split_val").image_counts == (2, 12, 0)
    assert len(DatasetCatalog.get("split_val")) == 3


def test_statistics_are_lazy_when_json_is_written_later(tmp_path, cleanup_names):
    cleanup_names.append("later_train")
    register_lvis_json("later_train", tmp_path / "lvis_v1_train.json", tmp_path)
    assert not hasattr(MetadataCatalog.get("later_train"), "category_image_counts")
    write_lvis(tmp_path)
    assert category_statistics("later_train").image_counts == (2, 12, 0)
    assert MetadataCatalog.get("later_train").frequency_groups == ["r", "c", "r"]


def test_statistics_of_a_dataset_registered_elsewhere(cleanup_names):
    records = [
        {
            "image_id": i,
            "annotations": [{"category_id": 0}, {"category_id": 1}]
            if i < 11
            else [{"category_id": 1}],
        }
        for i in range(120)
    ]
    cleanup_names.append("elsewhere")
    DatasetCatalog.register("elsewhere", lambda: records)
    MetadataCatalog.get("elsewhere").set(thing_classes=["a", "b"])
    stats = category_statistics("elsewhere")
    assert stats.image_counts == (11, 120) and stats.frequency_groups == ("c", "f")
    assert MetadataCatalog.get("elsewhere").num_train_images == 120
    with pytest.raises(KeyError, match="not registered"):
        category_statistics("no_such_dataset_anywhere")


def test_register_from_config(tmp_path, cleanup_names):
    train = write_lvis(tmp_path / "t", "train")
    val = write_lvis(tmp_path / "v", "val", counts=False)
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    assert register_from_config(cfg) == []
    cfg.DATASETS.EQLV2.CUSTOM_NAME = "cfgdata"
    cfg.DATASETS.EQLV2.CUSTOM_TRAIN_JSON = str(train)
    cfg.DATASETS.EQLV2.CUSTOM_TRAIN_IMAGES = str(tmp_path / "t")
    cfg.DATASETS.EQLV2.CUSTOM_VAL_JSON = str(val)
    cfg.DATASETS.EQLV2.CUSTOM_VAL_IMAGES = str(tmp_path / "v")
    cleanup_names.extend(["cfgdata_train", "cfgdata_val"])
    assert register_from_config(cfg) == ["cfgdata_train", "cfgdata_val"]
    assert register_from_config(cfg) == ["cfgdata_train", "cfgdata_val"]  # idempotent
    assert category_statistics("cfgdata_val").image_counts == (2, 12, 0)
    assert len(DatasetCatalog.get("cfgdata_val")) == 3

    cfg.DATASETS.EQLV2.CUSTOM_VAL_IMAGES = ""
    with pytest.raises(ValueError, match="CUSTOM_VAL_IMAGES"):
        register_from_config(cfg)
    cfg.DATASETS.EQLV2.CUSTOM_TRAIN_JSON = cfg.DATASETS.EQLV2.CUSTOM_VAL_JSON = ""
    with pytest.raises(ValueError, match="CUSTOM_TRAIN_JSON"):
        register_from_config(cfg)


def test_synthetic_root_from_config_env_and_default(tmp_path, monkeypatch):
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    monkeypatch.delenv("EQLV2_SYNTHETIC_ROOT", raising=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", "relative/ds")
    assert synthetic_root(cfg) == Path.cwd() / "relative/ds/eqlv2_synthetic"
    monkeypatch.setenv("EQLV2_SYNTHETIC_ROOT", str(tmp_path / "env"))
    assert synthetic_root() == tmp_path / "env"
    cfg.DATASETS.EQLV2.SYNTHETIC_ROOT = str(tmp_path / "cfg")
    assert synthetic_root(cfg) == tmp_path / "cfg"
    try:
        register_from_config(cfg)
        meta = MetadataCatalog.get("synthetic_lvis_train")
        assert meta.json_file == str(tmp_path / "cfg" / "lvis" / "lvis_v1_train.json")
        assert MetadataCatalog.get("synthetic_openimages_val").bbox_csv.startswith(
            str(tmp_path / "cfg")
        )
        assert category_statistics("synthetic_lvis_train").group_sizes() == {
            "r": 17,
            "c": 23,
            "f": 20,
        }
    finally:
        monkeypatch.undo()
        register_synthetic()
    assert MetadataCatalog.get("synthetic_lvis_train").synthetic_root == str(synthetic_root())
