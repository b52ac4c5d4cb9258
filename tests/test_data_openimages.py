"""OpenImages Challenge 2019 loader and registration on hand-written official-format files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from eqlv2.data import category_statistics, load_openimages, register_openimages
from eqlv2.data.lvis import datasets_root
from eqlv2.data.openimages import (
    BBOX_COLUMNS,
    BUILTIN_OPENIMAGES_SPLITS,
    OpenImagesFiles,
    read_hierarchy,
)

CLASSES = [("/m/0apple", "Apple"), ("/m/0boat", "Boat"), ("/m/0cat", "Cat")]
HIERARCHY = {
    "LabelName": "/m/0bl9f",
    "Subcategory": [
        {
            "LabelName": "/m/0thing",
            "Subcategory": [{"LabelName": "/m/0apple"}, {"LabelName": "/m/0boat"}],
        },
        {"LabelName": "/m/0cat", "Part": [{"LabelName": "/m/0apple"}]},
    ],
}
#: ImageID, LabelName, XMin, XMax, YMin, YMax, IsOccluded, IsTruncated, IsGroupOf
BOXES = [
    ("aaa1", "/m/0cat", 0.25, 0.5, 0.1, 0.9, 1, 0, 0),
    ("aaa1", "/m/0apple", 0.0, 1.0, 0.0, 0.5, 0, 1, 1),
    ("bbb2", "/m/0boat", 0.5, 1.0, 0.5, 1.0, 0, 0, 0),
]
LABELS = [
    ("aaa1", "/m/0cat", 1),
    ("aaa1", "/m/0apple", 1),
    ("aaa1", "/m/0boat", 0),
    ("ccc3", "/m/0cat", 0),
]


def write_openimages(root: Path, split: str = "train") -> OpenImagesFiles:
    files = OpenImagesFiles.at(root, split)
    os.makedirs(files.image_root, exist_ok=True)
    Path(files.classes_csv).write_text("".join(f"{mid},{name}\n" for mid, name in CLASSES))
    Path(files.hierarchy_json).write_text(json.dumps(HIERARCHY))
    rows = [",".join(BBOX_COLUMNS)]
    for image_id, label, x0, x1, y0, y1, occluded, truncated, group in BOXES:
        rows.append(
            f"{image_id},xclick,{label},1,{x0},{x1},{y0},{y1},{occluded},{truncated},{group},0,1"
        )
    Path(files.bbox_csv).write_text("\n".join(rows) + "\n")
    labels = ["ImageID,Source,LabelName,Confidence"]
    labels += [
        f"{image_id},verification,{label},{confidence}" for image_id, label, confidence in LABELS
    ]
    Path(files.image_labels_csv).write_text("\n".join(labels) + "\n")
    Image.new("RGB", (40, 20)).save(os.path.join(files.image_root, "aaa1.jpg"))
    # Stored 40x20 but rotated by 90 degrees through EXIF: detectron2 reads it as 20x40.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(os.path.join(files.image_root, "bbb2.jpg"), exif=exif)
    Image.new("RGB", (30, 30)).save(os.path.join(files.image_root, "ccc3.jpg"))
    return files


def test_loader_builds_standard_dicts(tmp_path):
    files = write_openimages(tmp_path)
    dicts = load_openimages(tmp_path, "train")
    assert [d["image_id"] for d in dicts] == ["aaa1", "bbb2", "ccc3"]
    first, second, third = dicts
    assert first["file_name"] == os.path.join(files.image_root, "aaa1.jpg")
    assert (first["width"], first["height"]) == (40, 20)
    assert (second["width"], second["height"]) == (20, 40)
    cat, apple = first["annotations"]
    assert cat["bbox"] == pytest.approx([10.0, 2.0, 20.0, 18.0])
    assert cat["bbox_mode"] == BoxMode.XYXY_ABS and cat["category_id"] == 2
    assert cat["is_occluded"] and not cat["is_truncated"] and not cat["is_group_of"]
    assert cat["is_inside"] and not cat["is_depiction"]
    assert apple["is_group_of"] and apple["is_truncated"] and apple["category_id"] == 0
    assert second["annotations"][0]["bbox"] == pytest.approx([10.0, 20.0, 20.0, 40.0])
    assert first["pos_category_ids"] == [0, 2] and first["neg_category_ids"] == [1]
    assert second["pos_category_ids"] == [] and second["neg_category_ids"] == []
    assert third["annotations"] == [] and third["neg_category_ids"] == [2]


def test_image_sizes_are_cached_next_to_the_csvs(tmp_path):
    write_openimages(tmp_path)
    load_openimages(tmp_path, "train")
    cache = json.loads((tmp_path / "eqlv2-image-sizes-train.json").read_text())
    assert cache == {"aaa1": [40, 20], "bbb2": [20, 40], "ccc3": [30, 30]}
    cache["bbb2"] = [21, 41]  # a second load reads the cache, not the image
    (tmp_path / "eqlv2-image-sizes-train.json").write_text(json.dumps(cache))
    assert load_openimages(tmp_path, "train")[1]["width"] == 21


def test_hierarchy_ancestors(tmp_path):
    files = write_openimages(tmp_path)
    ancestors = read_hierarchy(files.hierarchy_json)
    # The Challenge's rule: Subcategory edges only; the apple listed as a "Part" of the cat is
    # not a kind of cat.
    assert ancestors["/m/0apple"] == {"/m/0thing"}
    assert ancestors["/m/0boat"] == {"/m/0thing"} and ancestors["/m/0cat"] == set()
    assert "/m/0bl9f" not in ancestors


def test_registration_metadata_and_lazy_training_statistics(tmp_path, cleanup_names):
    write_openimages(tmp_path, "train")
    write_openimages(tmp_path, "validation")
    cleanup_names.extend(["oi_train", "oi_val"])
    register_openimages("oi_train", tmp_path, "train")
    register_openimages("oi_val", tmp_path, "val")
    meta = MetadataCatalog.get("oi_val")
    assert meta.evaluator_type == "openimages"
    assert meta.thing_classes == ["Apple", "Boat", "Cat"]
    assert meta.thing_mids == ["/m/0apple", "/m/0boat", "/m/0cat"]
    assert meta.bbox_csv.endswith("challenge-2019-validation-detection-bbox.csv")
    assert meta.image_labels_csv.endswith(
        "challenge-2019-validation-detection-human-imagelabels.csv"
    )
    assert meta.classes_csv.endswith("challenge-2019-classes-description-500.csv")
    assert meta.hierarchy_json.endswith("challenge-2019-label500-hierarchy.json")
    assert meta.image_root == str(tmp_path / "images" / "validation")
    assert not hasattr(meta, "category_image_counts")

    stats = category_statistics("oi_val")  # the training split's counts, read from its CSV
    assert stats.image_counts == (1, 1, 1) and stats.instance_counts == (1, 1, 1)
    assert stats.num_images == 3 and stats.frequency_groups == ("r", "r", "r")
    assert meta.category_instance_counts == [1, 1, 1]
    assert (tmp_path / "eqlv2-category-counts-train.json").is_file()

    records = DatasetCatalog.get("oi_train")
    assert len(records) == 3
    assert MetadataCatalog.get("oi_train").category_image_counts == [1, 1, 1]


def test_counts_cache_is_refreshed_when_the_csv_changes(tmp_path, cleanup_names):
    files = write_openimages(tmp_path)
    cleanup_names.append("oi_cache_train")
    register_openimages("oi_cache_train", tmp_path, "train")
    assert category_statistics("oi_cache_train").instance_counts == (1, 1, 1)
    with open(files.bbox_csv, "a") as handle:
        handle.write("bbb2,xclick,/m/0boat,1,0.1,0.2,0.1,0.2,0,0,0,0,0\n")
    register_openimages("oi_cache_train", tmp_path, "train")
    assert category_statistics("oi_cache_train").instance_counts == (1, 2, 1)


def test_builtin_names_point_at_datasets_root():
    for name, split in BUILTIN_OPENIMAGES_SPLITS.items():
        assert name in DatasetCatalog
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "openimages"
        assert meta.bbox_csv == os.path.join(
            datasets_root(), "openimages", f"challenge-2019-{split}-detection-bbox.csv"
        )
