"""Malformed dataset files fail with errors that name the file and the record.

Each case corrupts one copy of a tiny generated benchmark (LVIS JSON or OpenImages CSVs).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from eqlv2.data import DatasetFormatError, load_lvis_dataset, load_openimages, register_lvis_json
from eqlv2.data.openimages import OpenImagesFiles, read_hierarchy
from eqlv2.data.synthetic import generate_synthetic
from eqlv2.data.synthetic_plan import SyntheticSpec

TINY = SyntheticSpec(num_classes=6, seed=11, num_train_images=8, num_val_images=4)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    return {fmt: generate_synthetic(root / fmt, fmt, TINY) for fmt in ("lvis", "openimages")}


# ---------------------------------------------------------------------------------------------
# LVIS JSON


@pytest.fixture()
def lvis(pristine, tmp_path):
    """(json path, image root, parsed train JSON) of a private copy of the tiny LVIS dataset."""
    folder = Path(shutil.copytree(pristine["lvis"], tmp_path / "lvis"))
    json_file = folder / "lvis_v1_train.json"
    return json_file, str(folder) + os.sep, json.loads(json_file.read_text())


def _load(json_file: Path, image_root: str, data: dict) -> list[dict]:
    json_file.write_text(json.dumps(data))
    return load_lvis_dataset(json_file, image_root)


def test_lvis_malformed_json(lvis):
    json_file, root, _ = lvis
    json_file.write_text('{"images": [1, 2,')
    with pytest.raises(
        DatasetFormatError, match=r"lvis_v1_train.json: not valid JSON: .*line 1 column"
    ):
        load_lvis_dataset(json_file, root)


def test_lvis_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_lvis_dataset(tmp_path / "nothing.json", tmp_path)


def test_lvis_malformed_json_fails_at_registration(lvis):
    json_file, root, _ = lvis
    json_file.write_text("[not json")
    with pytest.raises(DatasetFormatError, match="lvis_v1_train.json: not valid JSON"):
        register_lvis_json("broken_lvis_train", json_file, root)


@pytest.mark.parametrize(
    ("corrupt", "pattern"),
    [
        (lambda d: d.pop("annotations"), r"top level: missing key\(s\) \['annotations'\]"),
        (lambda d: d.update(categories=[]), "'categories' must be a non-empty list"),
        (lambda d: d["categories"].append(dict(d["categories"][0])), r"categories\[6\]: duplicate category id 1"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\]: missing key\(s\) \['bbox'\]"),
        (lambda d: d["annotations"][0].update(category_id=999), r"annotation id 1 \(image 1\): unknown category id 999"),
        (lambda d: d["annotations"][0].update(image_id=4242), r"annotation id 1 \(image 4242\): unknown image id 4242"),
        (lambda d: d["annotations"][1].update(id=1), r"annotation id 1 \(image \d+\): duplicate annotation id"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), r"annotation id 1 \(image 1\): bbox \[1, 2, -3, 4\] has negative width"),
        (lambda d: d["annotations"][0].update(bbox=[150, 2, 30, 4]), r"annotation id 1 \(image 1\): bbox \[150, 2, 30, 4\] .* lies outside the \d+x\d+ image"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, "w", 4]), r"bbox \[1, 2, 'w', 4\] is not 4 finite numbers"),
        (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), r"annotation id 1 \(image 1\): segmentation polygon \[1, 2, 3, 4\]"),
        (lambda d: d["images"][0].pop("coco_url"), r"image id 1: no 'coco_url'"),
        (lambda d: d["images"][0].update(height=0), r"image id 1: height/width 0x\d+ must be positive"),
        (lambda d: d["images"][0].update(neg_category_ids=[77]), r"image id 1: neg_category_ids has unknown category ids \[77\]"),
        (
            lambda d: d["images"][0].update(neg_category_ids=[d["annotations"][0]["category_id"]]),
            r"annotation id 1 \(image 1\): category \d+ is listed in the image's neg_category_ids",
        ),
    ],
)  # fmt: skip
def test_lvis_bad_records(lvis, corrupt, pattern):
    json_file, root, data = lvis
    corrupt(data)
    with pytest.raises(DatasetFormatError, match=pattern) as info:
        _load(json_file, root, data)
    assert str(info.value).startswith("lvis_v1_train.json: ")
    assert isinstance(info.value, ValueError)


def test_lvis_zero_size_boxes_are_skipped_with_one_warning(lvis, caplog):
    json_file, root, data = lvis
    total = len(data["annotations"])
    data["annotations"][0]["bbox"][2] = 0.0
    data["annotations"][3]["bbox"][3] = 0.0
    with caplog.at_level(logging.WARNING):
        dicts = _load(json_file, root, data)
    assert sum(len(d["annotations"]) for d in dicts) == total - 2
    messages = [r.getMessage() for r in caplog.records if "zero-size" in r.getMessage()]
    assert messages == [
        f"lvis_v1_train.json: skipped 2 annotations with a zero-size bbox (file {json_file})"
    ]


def test_lvis_missing_image_file(lvis):
    json_file, root, data = lvis
    os.remove(os.path.join(root, "train2017", "000000000003.jpg"))
    with pytest.raises(
        FileNotFoundError,
        match=r"lvis_v1_train.json: image id 3: image file .*000000000003.jpg not found \(1 of 8",
    ):
        load_lvis_dataset(json_file, root)


# ---------------------------------------------------------------------------------------------
# OpenImages CSV


@pytest.fixture()
def oi(pristine, tmp_path) -> OpenImagesFiles:
    folder = shutil.copytree(pristine["openimages"], tmp_path / "openimages")
    return OpenImagesFiles.at(folder, "train")


def _rewrite_row(path: str, line: int, edit) -> str:
    """Apply ``edit`` to the fields of 1-based ``line``; returns the row's ImageID."""
    lines = Path(path).read_text().splitlines()
    fields = lines[line - 1].split(",")
    image_id = fields[0]
    lines[line - 1] = ",".join(edit(fields))
    Path(path).write_text("\n".join(lines) + "\n")
    return image_id


def _set(index: int, value: str):
    def edit(fields: list[str]) -> list[str]:
        fields[index] = value
        return fields

    return edit


def _swap_x(fields: list[str]) -> list[str]:
    fields[4], fields[5] = fields[5], fields[4]
    return fields


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (_set(2, "/m/nope"), r"unknown LabelName '/m/nope'"),
        (_set(4, "abc"), r"non-numeric coordinates \['abc'"),
        (
            _set(5, "1.5"),
            r"box XMin=.* XMax=1.5 .* lies outside the image \(normalized coordinates must be in \[0, 1\]\)",
        ),
        (_set(6, "-0.2"), r"box .* YMin=-0.2 .* lies outside the image"),
        (_swap_x, r"inverted box XMin="),
    ],
)
def test_openimages_bad_box_rows(oi, edit, pattern):
    image_id = _rewrite_row(oi.bbox_csv, 2, edit)
    with pytest.raises(
        DatasetFormatError,
        match=rf"challenge-2019-train-detection-bbox.csv: line 2 \(ImageID {image_id}\): {pattern}",
    ):
        load_openimages(oi.root, "train")


def test_openimages_binary_csv(oi):
    Path(oi.bbox_csv).write_bytes(b"ImageID,LabelName\n\xff\xfe\x00garbage\n")
    with pytest.raises(DatasetFormatError, match="bbox.csv: not a readable UTF-8 CSV file"):
        load_openimages(oi.root, "train")


def test_openimages_short_row(oi):
    _rewrite_row(oi.bbox_csv, 3, lambda fields: fields[:5])
    with pytest.raises(
        DatasetFormatError, match=r"bbox.csv: line 3 \(ImageID \w+\): 5 fields, the header has 13"
    ):
        load_openimages(oi.root, "train")


def test_openimages_missing_columns(oi):
    _rewrite_row(oi.bbox_csv, 1, lambda fields: [f if f != "XMax" else "Xmax" for f in fields])
    with pytest.raises(DatasetFormatError, match=r"bbox.csv: missing column\(s\) \['XMax'\]"):
        load_openimages(oi.root, "train")
    Path(oi.bbox_csv).write_text("")
    with pytest.raises(DatasetFormatError, match="bbox.csv: empty file"):
        load_openimages(oi.root, "train")


def test_openimages_zero_size_boxes_are_skipped_with_one_warning(oi, caplog):
    total = len(Path(oi.bbox_csv).read_text().splitlines()) - 1
    _rewrite_row(oi.bbox_csv, 2, _set(5, _field(oi.bbox_csv, 2, 4)))  # XMax = XMin
    _rewrite_row(oi.bbox_csv, 4, _set(7, _field(oi.bbox_csv, 4, 6)))  # YMax = YMin
    with caplog.at_level(logging.WARNING):
        dicts = load_openimages(oi.root, "train")
    assert sum(len(d["annotations"]) for d in dicts) == total - 2
    messages = [r.getMessage() for r in caplog.records if "zero width" in r.getMessage()]
    assert len(messages) == 1 and "skipped 2 boxes" in messages[0]


def _field(path: str, line: int, index: int) -> str:
    return Path(path).read_text().splitlines()[line - 1].split(",")[index]


def test_openimages_bad_image_label_confidence(oi):
    image_id = _rewrite_row(oi.image_labels_csv, 2, _set(3, "0.7"))
    with pytest.raises(
        DatasetFormatError,
        match=rf"human-imagelabels.csv: line 2 \(ImageID {image_id}\): Confidence '0.7'",
    ):
        load_openimages(oi.root, "train")


def test_openimages_bad_classes_csv(oi):
    Path(oi.classes_csv).write_text("/m/0a,Apple\n/m/0b,Boat,extra\n")
    with pytest.raises(
        DatasetFormatError,
        match=r"classes-description-500.csv: line 2: expected 'LabelName,DisplayName'",
    ):
        load_openimages(oi.root, "train")
    Path(oi.classes_csv).write_text("/m/0a,Apple\n/m/0a,Again\n")
    with pytest.raises(DatasetFormatError, match="line 2: duplicate LabelName /m/0a"):
        load_openimages(oi.root, "train")


def test_openimages_bad_hierarchy(oi):
    Path(oi.hierarchy_json).write_text(
        '{"LabelName": "/m/0bl9f", "Subcategory": [{"Label": "/m/x"}]}'
    )
    with pytest.raises(
        DatasetFormatError,
        match=r"label500-hierarchy.json: /m/0bl9f.Subcategory\[0\]: hierarchy node without a 'LabelName'",
    ):
        read_hierarchy(oi.hierarchy_json)
    Path(oi.hierarchy_json).write_text('{"LabelName": ')
    with pytest.raises(DatasetFormatError, match="label500-hierarchy.json: not valid JSON"):
        load_openimages(oi.root, "train")


def test_openimages_missing_image_file(oi):
    image_id = _field(oi.bbox_csv, 2, 0)
    os.remove(os.path.join(oi.image_root, f"{image_id}.jpg"))
    with pytest.raises(
        FileNotFoundError,
        match=rf"bbox.csv: ImageID {image_id}: image file .*{image_id}.jpg not found",
    ):
        load_openimages(oi.root, "train")
