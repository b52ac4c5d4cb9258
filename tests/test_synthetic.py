"""The offline benchmark: LVIS-like frequency profile, both file formats, determinism, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import load_lvis_json
from PIL import Image

from eqlv2.data import category_statistics, register_synthetic
from eqlv2.data.frequency import count_categories, frequency_groups
from eqlv2.data.openimages import load_openimages, read_classes, read_hierarchy
from eqlv2.data.synthetic import MARKER_FILE, ensure_synthetic, generate_synthetic, main
from eqlv2.data.synthetic_plan import SyntheticSpec, lvis_profile_counts, make_plan

#: Small enough to generate in a second or two, big enough for all three groups.
SMALL = SyntheticSpec(num_classes=12, seed=3, num_train_images=110, num_val_images=24)
#: For the OpenImages round trip (no frequent group needed).
MEDIUM = SyntheticSpec(num_classes=12, seed=3, num_train_images=48, num_val_images=16)
TINY = SyntheticSpec(num_classes=8, seed=5, num_train_images=16, num_val_images=6)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    ensure_synthetic(root, "lvis", spec=SMALL)
    ensure_synthetic(root, "openimages", spec=MEDIUM)
    return root


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_default_profile_has_lvis_group_proportions():
    """60 classes sampled from LVIS v1 counts keep LVIS's 337/461/405 r/c/f split (of 1203)."""
    plan = make_plan(SyntheticSpec())
    counts = plan.image_counts("train")
    sizes = Counter(frequency_groups(counts))
    for group, lvis_size in (("r", 337), ("c", 461), ("f", 405)):
        assert abs(sizes[group] - 60 * lvis_size / 1203) <= 2, sizes
    assert max(counts) <= 0.25 * 800 and min(counts) >= 1
    # Every category has enough validation images to measure its AP.
    assert min(plan.image_counts("val")) >= 4


def test_profile_without_room_for_frequent_categories_caps_counts():
    counts = lvis_profile_counts(30, num_images=50)
    assert counts.max() == 50 and counts.min() >= 1
    assert list(counts) == sorted(counts)


def test_lvis_files_load_with_detectron2_loader(small_root):
    folder = small_root / "lvis"
    plan = make_plan(SMALL)
    train = json.loads((folder / "lvis_v1_train.json").read_text())
    dicts = load_lvis_json(str(folder / "lvis_v1_train.json"), str(folder) + os.sep)
    assert len(dicts) == SMALL.num_train_images
    image_counts, instance_counts, _ = count_categories(dicts, SMALL.num_classes)
    assert image_counts == plan.image_counts("train")
    assert instance_counts == plan.instance_counts("train", "lvis")
    categories = sorted(train["categories"], key=lambda c: c["id"])
    assert [c["image_count"] for c in categories] == image_counts
    assert [c["instance_count"] for c in categories] == instance_counts
    assert [c["frequency"] for c in categories] == frequency_groups(image_counts)
    assert set(frequency_groups(image_counts)) == {"r", "c", "f"}
    assert all(set(c) >= {"id", "name", "synonyms", "def", "synset"} for c in categories)

    not_exhaustive_images = 0
    for record in dicts[:60]:
        with Image.open(record["file_name"]) as image:
            assert image.size == (record["width"], record["height"])
        present = {a["category_id"] + 1 for a in record["annotations"]}
        assert present, "every generated image has objects"
        assert not present & set(record["neg_category_ids"])
        assert set(record["not_exhaustive_category_ids"]) <= present
        not_exhaustive_images += bool(record["not_exhaustive_category_ids"])
        for anno in record["annotations"]:
            x, y, w, h = anno["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= record["width"] and y + h <= record["height"]
            for polygon in anno["segmentation"]:
                assert len(polygon) >= 6 and len(polygon) % 2 == 0
                assert all(x <= px <= x + w for px in polygon[0::2])
                assert all(y <= py <= y + h for py in polygon[1::2])
    assert not_exhaustive_images > 0


def test_lvis_val_covers_every_category(small_root):
    folder = small_root / "lvis"
    val = load_lvis_json(str(folder / "lvis_v1_val.json"), str(folder) + os.sep)
    image_counts, _, _ = count_categories(val, SMALL.num_classes)
    assert min(image_counts) >= 4
    # Every category missing from some validation image is verified absent on at least one.
    negatives = Counter(c for record in val for c in record["neg_category_ids"])
    absent_somewhere = {c + 1 for c, n in enumerate(image_counts) if n < len(val)}
    assert absent_somewhere and set(negatives) == absent_somewhere
    train_ids = {
        r["image_id"]
        for r in load_lvis_json(str(folder / "lvis_v1_train.json"), str(folder) + os.sep)
    }
    assert not train_ids & {r["image_id"] for r in val}


def test_openimages_files_load(small_root):
    folder = small_root / "openimages"
    plan = make_plan(MEDIUM)
    mids, names = read_classes(folder / "challenge-2019-classes-description-500.csv")
    assert names == plan.class_names("openimages") and len(set(mids)) == MEDIUM.num_classes
    ancestors = read_hierarchy(folder / "challenge-2019-label500-hierarchy.json")
    assert all(len(ancestors[mid]) == 1 for mid in mids)  # leaf -> shape node -> root
    assert len({next(iter(ancestors[mid])) for mid in mids}) > 1

    dicts = load_openimages(folder, "train")
    assert len(dicts) == MEDIUM.num_train_images
    image_counts, instance_counts, _ = count_categories(dicts, MEDIUM.num_classes)
    assert image_counts == plan.image_counts("train")
    assert instance_counts == plan.instance_counts("train", "openimages")
    boxes = [a for record in dicts for a in record["annotations"]]
    assert any(a["is_group_of"] for a in boxes) and any(a["is_truncated"] for a in boxes)
    assert any(a["is_occluded"] for a in boxes)
    for record in dicts:
        present = {a["category_id"] for a in record["annotations"]}
        assert set(record["pos_category_ids"]) == present
        assert record["neg_category_ids"] and not present & set(record["neg_category_ids"])
        assert Path(record["file_name"]).is_file()
    val = load_openimages(folder, "validation")
    assert len(val) == MEDIUM.num_val_images
    assert min(count_categories(val, MEDIUM.num_classes)[0]) >= 4


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = generate_synthetic(tmp_path / "a", "openimages", TINY)
    second = generate_synthetic(tmp_path / "b", "openimages", TINY)
    assert _tree_digest(first) == _tree_digest(second)
    lvis_a = generate_synthetic(tmp_path / "c", "lvis", TINY)
    lvis_b = generate_synthetic(tmp_path / "d", "lvis", TINY)
    assert _tree_digest(lvis_a) == _tree_digest(lvis_b)
    other = generate_synthetic(
        tmp_path / "e", "lvis", SyntheticSpec(**{**TINY.__dict__, "seed": 6})
    )
    assert _tree_digest(other) != _tree_digest(lvis_a)


def test_reuse_regenerate_and_refuse_foreign_folder(tmp_path):
    folder = generate_synthetic(tmp_path / "lvis", "lvis", TINY)
    stamp = (folder / "lvis_v1_train.json").stat().st_mtime_ns
    assert generate_synthetic(tmp_path / "lvis", "lvis", TINY) == folder
    assert (folder / "lvis_v1_train.json").stat().st_mtime_ns == stamp
    bigger = SyntheticSpec(**{**TINY.__dict__, "num_val_images": 12})
    generate_synthetic(tmp_path / "lvis", "lvis", bigger)
    assert json.loads((folder / MARKER_FILE).read_text())["num_val_images"] == 12
    assert len(json.loads((folder / "lvis_v1_val.json").read_text())["images"]) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lvis.lock", "lvis"]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        generate_synthetic(foreign, "lvis", TINY)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_concurrent_generation_writes_once(tmp_path):
    errors: list[BaseException] = []

    def run() -> None:
        try:
            generate_synthetic(tmp_path / "lvis", "lvis", TINY)
        except BaseException as error:  # noqa: B036 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lvis.lock", "lvis"]
    assert (
        len(
            load_lvis_json(
                str(tmp_path / "lvis" / "lvis_v1_train.json"), str(tmp_path / "lvis") + os.sep
            )
        )
        == TINY.num_train_images
    )


def test_registered_names_generate_on_first_load(tmp_path):
    try:
        names = register_synthetic(tmp_path, TINY)
        assert set(names) == {
            "synthetic_lvis_train", "synthetic_lvis_val",
            "synthetic_openimages_train", "synthetic_openimages_val",
        }  # fmt: skip
        before = category_statistics("synthetic_lvis_val")
        assert not (tmp_path / "lvis").exists(), "metadata must not need the files"
        dicts = DatasetCatalog.get("synthetic_lvis_train")
        counted = count_categories(dicts, TINY.num_classes)
        assert list(before.image_counts) == counted[0] and before.num_images == counted[2]
        assert list(before.instance_counts) == counted[1]
        meta = MetadataCatalog.get("synthetic_lvis_val")
        assert meta.evaluator_type == "lvis" and Path(meta.json_file).is_file()
        assert meta.thing_classes == list(before.class_names)

        oi = DatasetCatalog.get("synthetic_openimages_val")
        assert len(oi) == TINY.num_val_images
        meta = MetadataCatalog.get("synthetic_openimages_train")
        assert meta.evaluator_type == "openimages" and Path(meta.bbox_csv).is_file()
        assert len(meta.thing_mids) == len(meta.thing_classes) == TINY.num_classes
        stats = category_statistics("synthetic_openimages_train")
        assert (
            list(stats.instance_counts)
            == count_categories(DatasetCatalog.get("synthetic_openimages_train"), TINY.num_classes)[
                1
            ]
        )
    finally:
        register_synthetic()


def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "oi"
    proc = subprocess.run(
        [sys.executable, "-m", "eqlv2.data.synthetic", "--format", "openimages", "--out", str(out),
         "--num-classes", "6", "--num-train-images", "16", "--num-val-images", "6", "--seed", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["format"] == "openimages" and marker["num_classes"] == 6 and marker["seed"] == 2
    assert len(list((out / "images" / "train").glob("*.jpg"))) == 16
    assert len(list((out / "images" / "validation").glob("*.jpg"))) == 6


def test_cli_rejects_bad_sizes(tmp_path, caplog):
    assert main(["--format", "lvis", "--out", str(tmp_path / "x"), "--num-classes", "0"]) == 2
    assert "num_classes" in caplog.text
    assert not (tmp_path / "x").exists()
