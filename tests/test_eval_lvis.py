"""LVIS evaluation: the fast engine against the official API, the LVIS rules, the evaluator."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

from eqlv2.config import add_eqlv2_config
from eqlv2.evaluation import (
    METRIC_NAMES,
    FastLVISEngine,
    LVISDetections,
    LVISEvaluator,
    OfficialLVISEngine,
    build_evaluator,
    summary,
)

# 20 categories with non-contiguous LVIS ids and a mix of frequency groups.
CATEGORY_IDS = [3 * k + 2 for k in range(20)]
FREQUENCIES = ["r"] * 6 + ["c"] * 7 + ["f"] * 7
HEIGHT, WIDTH = 240, 320


def _octagon(box) -> list[list[float]]:
    x, y, w, h = (float(v) for v in box)
    dx, dy = 0.3 * w, 0.3 * h
    return [
        [x + dx, y, x + w - dx, y, x + w, y + dy, x + w, y + h - dy]
        + [x + w - dx, y + h, x + dx, y + h, x, y + h - dy, x, y + dy]
    ]


def _rle(polygon, height: int = HEIGHT, width: int = WIDTH) -> dict:
    rle = mask_util.merge(mask_util.frPyObjects(polygon, height, width))
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def _box(rng, scale_min=6.0, scale_max=200.0) -> list[float]:
    w = float(np.exp(rng.uniform(np.log(scale_min), np.log(scale_max))))
    h = float(np.clip(w * np.exp(rng.normal(0, 0.3)), 5, HEIGHT - 2))
    w = min(w, WIDTH - 2)
    return [float(rng.uniform(0, WIDTH - w)), float(rng.uniform(0, HEIGHT - h)), w, h]


def make_case(seed: int = 0, num_images: int = 30, dets_per_image: int = 40):
    """A small LVIS v1 ground truth (polygon masks, neg / not-exhaustive labels) and results with
    boxes and RLE masks: jittered copies of gt boxes (right or wrong category) and random boxes
    of labelled, negative and unrelated categories."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        chosen = [int(c) for c in rng.choice(CATEGORY_IDS, size=6, replace=False)]
        pos, neg = chosen[:3], chosen[3:]
        images.append(
            {
                "id": image_id,
                "height": HEIGHT,
                "width": WIDTH,
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": [pos[0]] if image_id % 4 == 0 else [],
            }
        )
        gts = []
        for cat in pos:
            for _ in range(int(rng.integers(1, 4))):
                box = _box(rng)
                polygon = _octagon(box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": cat,
                        "bbox": box,
                        "area": float(mask_util.area(_rle(polygon))),
                        "segmentation": polygon,
                    }
                )
                gts.append((box, cat))
        for k in range(dets_per_image):
            if k < 2 * len(gts):
                box, cat = gts[k % len(gts)]
                x, y, w, h = box
                w2, h2 = w * np.exp(rng.normal(0, 0.15)), h * np.exp(rng.normal(0, 0.15))
                box = [
                    float(np.clip(x + rng.normal(0, 0.1) * w, 0, WIDTH - w2)),
                    float(np.clip(y + rng.normal(0, 0.1) * h, 0, HEIGHT - h2)),
                    float(w2),
                    float(h2),
                ]
                if rng.random() < 0.15:
                    cat = int(rng.choice(chosen))
                score = float(rng.uniform(0.3, 1.0))
            else:
                box = _box(rng)
                cat = (
                    int(rng.choice(chosen)) if rng.random() < 0.6 else int(rng.choice(CATEGORY_IDS))
                )
                score = float(rng.uniform(0.0, 0.6))
            results.append(
                {
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": box,
                    "score": score,
                    "segmentation": _rle(_octagon(box)),
                }
            )
    categories = [
        {"id": c, "name": f"cat{c}", "frequency": f}
        for c, f in zip(CATEGORY_IDS, FREQUENCIES, strict=True)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}, results


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    gt, results = make_case()
    path = tmp_path_factory.mktemp("lvis") / "lvis_v1_small.json"
    path.write_text(json.dumps(gt))
    return path, gt, results


@pytest.fixture(scope="module")
def official(case):
    return OfficialLVISEngine(case[0])


@pytest.fixture(scope="module")
def fast(case):
    return FastLVISEngine(case[0], workers=1)


def _assert_same_metrics(a: dict, b: dict, tol: float = 1e-3) -> None:
    assert set(a) == set(b) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        if math.isnan(a[name]) or math.isnan(b[name]):
            assert math.isnan(a[name]) and math.isnan(b[name]), name
        else:
            assert abs(a[name] - b[name]) <= tol, (name, a[name], b[name])


@pytest.mark.parametrize("task", ["bbox", "segm"])
def test_fast_engine_matches_official_api(case, official, fast, task):
    _, _, results = case
    ref = official.evaluate(results, task)
    got = fast.evaluate(results, task)
    _assert_same_metrics(ref.metrics, got.metrics)
    # Stronger than the reported numbers: the whole precision and recall arrays.
    np.testing.assert_allclose(got.precision, ref.precision, atol=1e-9)
    np.testing.assert_allclose(got.recall, ref.recall, atol=1e-9)
    assert all(not math.isnan(ref.metrics[k]) for k in ("AP", "APr", "APc", "APf"))
    assert 5.0 < ref.metrics["AP"] < 95.0


def test_official_engine_matches_detectron2_lvis_evaluation(case, official):
    from detectron2.evaluation.lvis_evaluation import _evaluate_predictions_on_lvis

    from eqlv2.evaluation import lvis_numpy_compat

    _, _, results = case
    with lvis_numpy_compat():
        d2 = _evaluate_predictions_on_lvis(official.lvis_gt, [dict(r) for r in results], "segm")
    ours = official.evaluate(results, "segm").metrics
    for name in METRIC_NAMES:  # detectron2 reports an undefined number as -100, we as NaN
        assert ours[name] == pytest.approx(d2[name], abs=1e-9) or (
            math.isnan(ours[name]) and d2[name] == -100
        )


def test_forked_workers_give_the_same_result(case, fast):
    _, _, results = case
    sharded = FastLVISEngine(case[0], workers=2)
    for task in ("bbox", "segm"):
        a, b = fast.evaluate(results, task), sharded.evaluate(results, task)
        np.testing.assert_array_equal(a.precision, b.precision)


def test_falls_back_to_one_process_without_workers(case, fast, monkeypatch):
    import eqlv2.evaluation.lvis_engines as engines

    def no_pool(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr(engines, "ProcessPoolExecutor", no_pool)
    _, _, results = case
    sharded = FastLVISEngine(case[0], workers=2)
    np.testing.assert_array_equal(
        sharded.evaluate(results, "bbox").precision, fast.evaluate(results, "bbox").precision
    )


def test_columnar_input_equals_result_dicts(case, fast):
    _, _, results = case
    detections = LVISDetections.from_results(results)
    assert len(detections) == len(results) and detections.has_masks
    a = fast.evaluate(results, "bbox")
    b = fast.evaluate(detections, "bbox")
    np.testing.assert_array_equal(a.precision, b.precision)
    back = detections.to_results()
    assert (
        back[5]["bbox"] == results[5]["bbox"]
        and back[5]["segmentation"] == results[5]["segmentation"]
    )


# --- the LVIS rules, on hand-made cases --------------------------------------------------------


def _tiny_gt(neg=(), not_exhaustive=()) -> dict:
    """Two images, categories 1 (frequent) and 2 (rare); one box of category 1 on image 1."""
    return {
        "images": [
            {
                "id": 1,
                "height": 100,
                "width": 100,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": list(not_exhaustive),
            },
            {
                "id": 2,
                "height": 100,
                "width": 100,
                "neg_category_ids": list(neg),
                "not_exhaustive_category_ids": [],
            },
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 40, 40],
                "area": 1600.0,
                "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 2,
                "bbox": [60, 60, 30, 30],
                "area": 900.0,
                "segmentation": [[60, 60, 90, 60, 90, 90, 60, 90]],
            },
        ],
        "categories": [
            {"id": 1, "name": "a", "frequency": "f"},
            {"id": 2, "name": "b", "frequency": "r"},
        ],
    }


def _both(tmp_path, gt: dict, results: list[dict], max_dets: int = 300) -> dict:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ref = OfficialLVISEngine(path, max_dets=max_dets).evaluate(results, "bbox").metrics
    got = FastLVISEngine(path, max_dets=max_dets, workers=1).evaluate(results, "bbox").metrics
    _assert_same_metrics(ref, got, tol=1e-9)
    return got


def _det(image_id, cat, box, score):
    return {"image_id": image_id, "category_id": cat, "bbox": list(box), "score": score}


PERFECT = [_det(1, 1, [10, 10, 40, 40], 0.5), _det(1, 2, [60, 60, 30, 30], 0.5)]


def test_detection_of_unlabelled_category_is_dropped(tmp_path):
    # Image 2 has neither a box nor a negative label of category 1: a confident false detection
    # there does not count.
    base = _both(tmp_path, _tiny_gt(), PERFECT)
    with_extra = _both(tmp_path, _tiny_gt(), PERFECT + [_det(2, 1, [0, 0, 30, 30], 0.9)])
    assert base["APf"] == pytest.approx(100.0) and with_extra["APf"] == pytest.approx(100.0)


def test_detection_of_negative_category_is_false_positive(tmp_path):
    # Category 1 is verified absent on image 2: the same detection is a false positive ranked
    # first, so precision is 1/2 at full recall, for every IoU threshold.
    got = _both(tmp_path, _tiny_gt(neg=[1]), PERFECT + [_det(2, 1, [0, 0, 30, 30], 0.9)])
    assert got["APf"] == pytest.approx(50.0)
    assert got["APr"] == pytest.approx(100.0)


def test_unmatched_detection_of_not_exhaustive_category_is_ignored(tmp_path):
    extra = [_det(1, 1, [55, 0, 40, 40], 0.9)]  # category 1, image 1, matches nothing
    exhaustive = _both(tmp_path, _tiny_gt(), PERFECT + extra)
    not_exhaustive = _both(tmp_path, _tiny_gt(not_exhaustive=[1]), PERFECT + extra)
    assert exhaustive["APf"] == pytest.approx(50.0)
    assert not_exhaustive["APf"] == pytest.approx(100.0)


def test_only_top_300_detections_per_image_count(tmp_path):
    # 300 confident detections of the negative category on image 2 do not push out the true
    # positive of image 1 (the cut is per image) ...
    flood = [_det(2, 1, [0, 0, 20, 20], 0.99) for _ in range(300)]
    got = _both(tmp_path, _tiny_gt(neg=[1]), PERFECT + flood)
    assert 0.0 < got["APf"] < 1.0
    # ... but on image 1 they do: with 300 better-scored detections the true positive is cut.
    flood1 = [_det(1, 2, [0, 0, 5, 5], 0.99) for _ in range(300)]
    cut = _both(tmp_path, _tiny_gt(), PERFECT + flood1)
    assert cut["APf"] == pytest.approx(0.0)
    kept = _both(tmp_path, _tiny_gt(), PERFECT + flood1, max_dets=302)
    assert kept["APf"] == pytest.approx(100.0)


def test_top_k_keeps_earlier_of_equal_scores():
    d = LVISDetections([1, 1, 1, 2], [1, 1, 1, 1], [0.5, 0.9, 0.5, 0.1], np.zeros((4, 4)))
    np.testing.assert_array_equal(d.top_k_per_image(2), [1, 0, 3])


# --- the detectron2 evaluator -------------------------------------------------------------------


def _instances(results: list[dict], contiguous: dict[int, int]) -> Instances:
    boxes = torch.tensor([r["bbox"] for r in results], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    inst = Instances((HEIGHT, WIDTH))
    inst.pred_boxes = Boxes(boxes)
    inst.scores = torch.tensor([r["score"] for r in results], dtype=torch.float32)
    inst.pred_classes = torch.tensor(
        [contiguous[r["category_id"]] for r in results], dtype=torch.int64
    )
    masks = [
        mask_util.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})
        for r in results
    ]
    inst.pred_masks = (
        torch.from_numpy(np.stack(masks).astype(bool))
        if masks
        else torch.zeros((0, HEIGHT, WIDTH), dtype=torch.bool)
    )
    return inst


@pytest.fixture(scope="module")
def registered(case):
    name = "eqlv2_test_eval_lvis_small"
    if name not in MetadataCatalog.list():
        MetadataCatalog.get(name).set(
            json_file=str(case[0]),
            evaluator_type="lvis",
            thing_classes=[f"cat{c}" for c in CATEGORY_IDS],
            thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(CATEGORY_IDS)},
        )
    return name


@pytest.mark.parametrize("engine", ["fast", "lvis"])
def test_evaluator_reports_detectron2_shape_and_official_numbers(
    case, official, registered, engine
):
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json

    _, _, results = case
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    cfg.TEST.EQLV2.LVIS_ENGINE = engine
    evaluator = build_evaluator(cfg, registered)
    assert isinstance(evaluator, LVISEvaluator)
    contiguous = {c: i for i, c in enumerate(CATEGORY_IDS)}
    evaluator.reset()
    reference = []
    for image_id in range(1, 11):
        mine = [r for r in results if r["image_id"] == image_id]
        inst = _instances(mine, contiguous)
        evaluator.process(
            [{"image_id": image_id, "height": HEIGHT, "width": WIDTH}], [{"instances": inst}]
        )
        for r in instances_to_coco_json(inst, image_id):
            r["category_id"] = CATEGORY_IDS[r["category_id"]]
            reference.append(r)
    out = evaluator.evaluate()
    assert isinstance(out, OrderedDict) and list(out) == ["bbox", "segm"]
    for task in ("bbox", "segm"):
        _assert_same_metrics(out[task], official.evaluate(reference, task).metrics, tol=1e-6)
    flat = summary(out)
    assert flat == {
        "AP": out["segm"]["AP"],
        "APr": out["segm"]["APr"],
        "APc": out["segm"]["APc"],
        "APf": out["segm"]["APf"],
        "APb": out["bbox"]["AP"],
    }


@pytest.mark.parametrize("engine", ["fast", "lvis"])
def test_max_images_scores_the_ground_truth_of_the_first_images_only(case, registered, tmp_path, engine):
    """TEST.EQLV2.MAX_IMAGES 10: the first 10 images' detections against a JSON file holding only
    those images (written here), not against all 30 images of the ground truth."""
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json

    path, gt, results = case
    name = "eqlv2_test_eval_lvis_first_images"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"image_id": image["id"]} for image in gt["images"]])
        MetadataCatalog.get(name).set(**{k: v for k, v in MetadataCatalog.get(registered).as_dict().items() if k != "name"})
    first = [image["id"] for image in gt["images"][:10]]
    subset = {**gt, "images": gt["images"][:10], "annotations": [a for a in gt["annotations"] if a["image_id"] in first]}
    (tmp_path / "first.json").write_text(json.dumps(subset))
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    cfg.TEST.EQLV2.LVIS_ENGINE, cfg.TEST.EQLV2.MAX_IMAGES = engine, 10
    evaluator = build_evaluator(cfg, name)
    contiguous = {c: i for i, c in enumerate(CATEGORY_IDS)}
    reference = []
    for image_id in first:
        inst = _instances([r for r in results if r["image_id"] == image_id], contiguous)
        evaluator.process([{"image_id": image_id, "height": HEIGHT, "width": WIDTH}], [{"instances": inst}])
        reference += [{**r, "category_id": CATEGORY_IDS[r["category_id"]]} for r in instances_to_coco_json(inst, image_id)]
    out = evaluator.evaluate()
    for task in ("bbox", "segm"):
        expected = OfficialLVISEngine(tmp_path / "first.json").evaluate(reference, task).metrics
        _assert_same_metrics(out[task], expected, tol=1e-6)
        assert out[task]["AP"] > OfficialLVISEngine(path).evaluate(reference, task).metrics["AP"] + 5


def test_max_images_with_a_coco_dataset_scores_those_images_only(case, registered, tmp_path):
    """detectron2's COCOEvaluator scores every image unless told otherwise: under MAX_IMAGES 10 it
    gives what it gives on a JSON file holding only those 10 images."""
    _, lvis_gt, results = case
    gt = {**lvis_gt, "annotations": [{**a, "iscrowd": 0} for a in lvis_gt["annotations"]]}  # COCO's field
    first = [image["id"] for image in gt["images"][:10]]
    subset = {**gt, "images": gt["images"][:10], "annotations": [a for a in gt["annotations"] if a["image_id"] in first]}
    path = tmp_path / "all.json"
    path.write_text(json.dumps(gt))
    (tmp_path / "first.json").write_text(json.dumps(subset))
    metadata = {"evaluator_type": "coco", "thing_dataset_id_to_contiguous_id": {c: i for i, c in enumerate(CATEGORY_IDS)}}
    for name, json_file in (("eqlv2_test_eval_coco_first_images", path), ("eqlv2_test_eval_coco_subset_file", tmp_path / "first.json")):
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda: [{"image_id": image["id"]} for image in gt["images"]])
        MetadataCatalog.get(name).set(json_file=str(json_file), **metadata)
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    cfg.TEST.EQLV2.MAX_IMAGES = 10
    limited = build_evaluator(cfg, "eqlv2_test_eval_coco_first_images", str(tmp_path / "limited"))
    reference = COCOEvaluator("eqlv2_test_eval_coco_subset_file", output_dir=str(tmp_path / "reference"))
    contiguous = {c: i for i, c in enumerate(CATEGORY_IDS)}
    for evaluator in (limited, reference):
        evaluator.reset()
        for image_id in first:
            inst = _instances([r for r in results if r["image_id"] == image_id], contiguous)
            evaluator.process([{"image_id": image_id, "height": HEIGHT, "width": WIDTH}], [{"instances": inst}])
    out, expected = limited.evaluate(), reference.evaluate()
    assert out["bbox"]["AP"] == pytest.approx(expected["bbox"]["AP"], abs=1e-9) and out["bbox"]["AP"] > 0


def test_max_images_must_not_be_negative(registered):
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    cfg.TEST.EQLV2.MAX_IMAGES = -1
    with pytest.raises(ValueError, match="TEST.EQLV2.MAX_IMAGES must be 0"):
        build_evaluator(cfg, registered)


def test_summary_without_masks_uses_box_numbers():
    box = dict.fromkeys(METRIC_NAMES, 1.0) | {"AP": 30.0, "APr": 10.0}
    assert summary({"bbox": box}) == {"AP": 30.0, "APr": 10.0, "APc": 1.0, "APf": 1.0, "APb": 30.0}


def test_evaluator_with_no_detections_reports_nan(registered):
    evaluator = LVISEvaluator(registered, distributed=False)
    inst = Instances((HEIGHT, WIDTH))
    inst.pred_boxes = Boxes(torch.zeros((0, 4)))
    inst.scores = torch.zeros(0)
    inst.pred_classes = torch.zeros(0, dtype=torch.int64)
    evaluator.process([{"image_id": 1}], [{"instances": inst}])
    out = evaluator.evaluate()
    assert list(out) == ["bbox"] and all(math.isnan(v) for v in out["bbox"].values())


def test_build_evaluator_by_evaluator_type(tmp_path, registered):
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    cfg.TEST.EQLV2.LVIS_ENGINE = "lvis"
    assert build_evaluator(cfg, registered).engine_name == "lvis"
    cfg.TEST.EQLV2.LVIS_ENGINE = "nope"
    with pytest.raises(ValueError, match="LVIS_ENGINE"):
        build_evaluator(cfg, registered)

    coco = tmp_path / "coco.json"
    coco.write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]})
    )
    MetadataCatalog.get("eqlv2_test_eval_coco").set(json_file=str(coco), evaluator_type="coco")
    assert isinstance(
        build_evaluator(get_cfg(), "eqlv2_test_eval_coco", str(tmp_path)), COCOEvaluator
    )
    MetadataCatalog.get("eqlv2_test_eval_unknown").set(evaluator_type="voc")
    with pytest.raises(NotImplementedError, match="voc"):
        build_evaluator(cfg, "eqlv2_test_eval_unknown")


def test_scoring_goes_through_the_engine(tmp_path):
    # Guards the override of detectron2's private LVISEvaluator._eval_predictions: without rare
    # or common categories, the official API reports APr = APc = -100 through detectron2, the
    # project's engines NaN. A NaN here shows that the engine scored the predictions.
    gt = _tiny_gt()
    gt["categories"][1]["frequency"] = "f"
    path = tmp_path / "all_frequent.json"
    path.write_text(json.dumps(gt))
    name = "eqlv2_test_eval_lvis_all_frequent"
    MetadataCatalog.get(name).set(json_file=str(path), evaluator_type="lvis")
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0]])
    inst = Instances((100, 100), pred_boxes=Boxes(boxes), scores=torch.tensor([0.9, 0.8]))
    inst.pred_classes = torch.tensor([0, 1])
    for engine in ("fast", "lvis"):
        evaluator = LVISEvaluator(name, distributed=False, engine=engine)
        evaluator.reset()
        evaluator.process([{"image_id": 1}], [{"instances": inst}])
        out = evaluator.evaluate()["bbox"]
        assert out["AP"] == pytest.approx(100.0) and out["APf"] == pytest.approx(100.0)
        assert math.isnan(out["APr"]) and math.isnan(out["APc"]), engine
