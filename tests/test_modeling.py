"""The detectron2 integration: config keys, heads, predict_probs, checkpoints, the hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import eqlv2.modeling  # noqa: F401  (registers the heads)
from eqlv2.config import add_eqlv2_config
from eqlv2.losses import EQLv2Loss, SoftmaxCELoss
from eqlv2.modeling import EQLv2FastRCNNOutputLayers
from eqlv2.modeling.roi_heads import classification_losses

TINY = "configs/tiny/Base-Tiny.yaml"


def tiny_cfg(*opts):
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    cfg.merge_from_file(TINY)
    cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 5, *opts])
    return cfg


def test_config_defaults_are_the_papers():
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    eql = cfg.MODEL.EQLV2
    assert (eql.LOSS, eql.GAMMA, eql.MU, eql.ALPHA, eql.PRIOR_PROB) == ("eqlv2", 12.0, 0.8, 4.0, 0.001)
    assert eql.BACKGROUND_PRIOR_PROB == 0.75  # 1 - ROI_HEADS.POSITIVE_FRACTION, README "Results"
    assert eql.USE_AGNOSTIC_TASK and eql.NEG_DOWN_WEIGHT and eql.POS_UP_WEIGHT


def test_paper_config_has_section_4_2_settings():
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    cfg.merge_from_file("configs/LVISv1/mask_rcnn_R_50_FPN_1x_eqlv2.yaml")
    assert cfg.MODEL.ROI_HEADS.NAME == "EQLv2StandardROIHeads"
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MOMENTUM) == (0.02, 16, 0.9)
    assert cfg.SOLVER.WEIGHT_DECAY == 1e-4
    assert (cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE, cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION) == (512, 0.25)
    assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
    assert (cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, cfg.TEST.DETECTIONS_PER_IMAGE) == (1e-4, 300)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1203 and cfg.MODEL.MASK_ON


@pytest.mark.parametrize(
    "loss, expected_bias",
    [("eqlv2", -math.log((1 - 0.001) / 0.001)), ("sigmoid", -math.log((1 - 0.001) / 0.001)), ("softmax", 0.0)],
)
def test_box_predictor_uses_the_chosen_loss_and_bias_prior(loss, expected_bias):
    model = build_model(tiny_cfg("MODEL.EQLV2.LOSS", loss))
    predictor = model.roi_heads.box_predictor
    assert isinstance(predictor, EQLv2FastRCNNOutputLayers)
    assert isinstance(predictor.classification_loss, SoftmaxCELoss if loss == "softmax" else torch.nn.Module)
    bias = predictor.cls_score.bias.detach()
    categories = predictor.num_classes
    assert torch.allclose(bias[:categories], torch.full((categories,), expected_bias))
    if loss == "eqlv2":  # column C: the agnostic task's background logit starts at BACKGROUND_PRIOR_PROB
        assert torch.sigmoid(bias[categories]).item() == pytest.approx(0.75, rel=1e-6)


def test_cascade_heads_have_one_eqlv2_loss_per_stage():
    cfg = tiny_cfg("MODEL.ROI_HEADS.NAME", "EQLv2CascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True)
    model = build_model(cfg)
    losses = classification_losses(model)
    assert len(losses) == 3 and all(isinstance(loss, EQLv2Loss) for loss in losses)
    assert len({id(loss) for loss in losses}) == 3
    weights = [p.box2box_transform.weights for p in model.roi_heads.box_predictor]
    assert weights == [tuple(w) for w in cfg.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS]


def test_predict_probs_is_eq10_in_detectron2_layout():
    model = build_model(tiny_cfg())
    predictor = model.roi_heads.box_predictor
    logits = torch.randn(7, 6, dtype=torch.float64)
    proposals = [Instances((10, 10), proposal_boxes=Boxes(torch.zeros(n, 4))) for n in (3, 4)]
    probs = torch.cat(predictor.predict_probs((logits.float(), None), proposals))
    expected = torch.sigmoid(logits[:, :5]) * (1 - torch.sigmoid(logits[:, 5:]))
    assert probs.shape == (7, 6)
    assert torch.allclose(probs[:, :5].double(), expected, atol=1e-6)
    assert torch.all(probs[:, 5] == 0)


def _train_classifier_steps(loss: EQLv2Loss, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        logits = torch.randn(20, loss.num_classes + 1, generator=generator, requires_grad=True)
        labels = torch.randint(0, loss.num_classes + 1, (20,), generator=generator)
        loss(logits, labels).backward()


def test_statistics_survive_a_detectron2_checkpoint(tmp_path):
    model = build_model(tiny_cfg())
    loss = classification_losses(model)[0]
    _train_classifier_steps(loss, 4)
    assert loss.pos_grad.abs().sum() > 0
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_0000003")

    restored = build_model(tiny_cfg())
    restored_loss = classification_losses(restored)[0]
    assert restored_loss.pos_grad.abs().sum() == 0
    DetectionCheckpointer(restored, save_dir=str(tmp_path)).resume_or_load(str(tmp_path / "missing.pth"), resume=True)
    assert torch.equal(restored_loss.pos_grad, loss.pos_grad)
    assert torch.equal(restored_loss.neg_grad, loss.neg_grad)
    # both continue identically
    _train_classifier_steps(loss, 2, seed=5)
    _train_classifier_steps(restored_loss, 2, seed=5)
    assert torch.equal(restored_loss.neg_grad, loss.neg_grad)


class _FakeTrainer:
    """Just the attributes a hook reads; the model is a real detectron2 model."""

    def __init__(self, model, iteration, max_iter):
        self.model, self.iter, self.max_iter = model, iteration, max_iter


def test_gradient_statistics_hook_writes_group_summaries():
    from eqlv2.engine.hooks import GradientStatisticsHook
    from eqlv2.losses.statistics import GradientStatistics

    model = build_model(tiny_cfg())
    loss = classification_losses(model)[0]
    _train_classifier_steps(loss, 3)
    groups = ["r", "r", "c", "f", "f"]
    hook = GradientStatisticsHook(period=5, frequency_groups=groups)
    with EventStorage(0) as storage:
        hook.trainer = _FakeTrainer(model, iteration=3, max_iter=100)
        hook.after_step()
        assert not any(key.startswith("eqlv2/") for key in storage.latest())
        hook.trainer.iter = 4
        hook.after_step()
        latest = {k: v for k, (v, _) in storage.latest().items()}
    ratio = (loss.pos_grad / (loss.neg_grad + 1e-10)).numpy()
    assert latest["eqlv2/ratio_mean_r"] == pytest.approx(ratio[:2].mean())
    assert latest["eqlv2/ratio_mean_f"] == pytest.approx(ratio[3:].mean())
    q, r = loss.current_weights()
    assert latest["eqlv2/r_mean_c"] == pytest.approx(float(r[2]))
    (snapshot,) = hook.snapshots()
    assert isinstance(snapshot, GradientStatistics)
    np.testing.assert_allclose(snapshot.q, q.numpy())
    with pytest.raises(ValueError, match="period"):
        GradientStatisticsHook(period=0)


# --------------------------------------------------------------------------- 2C-softmax, statistics
@pytest.mark.parametrize("loss", ["eqlv2", "eqlv2_2c_softmax"])
def test_background_prior_sets_only_the_background_column(loss):
    model = build_model(tiny_cfg("MODEL.EQLV2.LOSS", loss, "MODEL.EQLV2.BACKGROUND_PRIOR_PROB", 0.3))
    bias = model.roi_heads.box_predictor.cls_score.bias.detach().double()
    if loss == "eqlv2_2c_softmax":
        bias = bias[:6] - bias[6:]  # a pair's softmax is the sigmoid of its logits' difference
    initial = torch.sigmoid(bias)
    assert initial[5].item() == pytest.approx(0.3, rel=1e-6)  # column C = 5: background / objectness
    assert torch.allclose(initial[:5], torch.full((5,), 0.001, dtype=torch.float64), rtol=1e-5)


def test_two_class_softmax_predictor_has_2c_logits_and_pair_softmax_probs():
    from eqlv2.losses import EQLv2TwoClassSoftmaxLoss

    model = build_model(tiny_cfg("MODEL.EQLV2.LOSS", "eqlv2_2c_softmax"))
    predictor = model.roi_heads.box_predictor
    assert isinstance(predictor.classification_loss, EQLv2TwoClassSoftmaxLoss)
    assert predictor.cls_score.out_features == 12 and predictor.bbox_pred.out_features == 5 * 4
    bias = predictor.cls_score.bias.detach().double()
    initial = torch.exp(bias[:6]) / (torch.exp(bias[:6]) + torch.exp(bias[6:]))
    assert torch.allclose(initial[:5], torch.full((5,), 0.001, dtype=torch.float64), rtol=1e-5)
    assert initial[5].item() == pytest.approx(0.75, rel=1e-6)  # the default background prior

    logits = torch.randn(7, 12, dtype=torch.float64) * 3
    proposals = [Instances((10, 10), proposal_boxes=Boxes(torch.zeros(n, 4))) for n in (2, 5)]
    probs = torch.cat(predictor.predict_probs((logits.float(), None), proposals)).double()
    pair = torch.stack([logits[:, :6], logits[:, 6:]], dim=2).softmax(dim=2)[..., 0]  # (7, 6)
    expected = pair[:, :5] * (1 - pair[:, 5:])
    assert probs.shape == (7, 6) and torch.all(probs[:, 5] == 0)
    assert torch.allclose(probs[:, :5], expected, atol=1e-6)
    weight = predictor.cls_score.weight.detach()
    assert torch.allclose(predictor.category_weight_norms(), (weight[:5] - weight[6:11]).norm(dim=1))


def _synthetic_batch(num_images: int = 2, seed: int = 0) -> list[dict]:
    """detectron2 training inputs: 96x96 images with 2-3 random boxes of classes 0..4 each."""
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        corners = torch.randint(0, 50, (3, 2), generator=generator).float()
        sizes = torch.randint(16, 40, (3, 2), generator=generator).float()
        instances = Instances((96, 96))
        instances.gt_boxes = Boxes(torch.cat([corners, corners + sizes], dim=1))
        instances.gt_classes = torch.randint(0, 5, (3,), generator=generator)
        image = torch.randint(0, 255, (3, 96, 96), generator=generator).float()
        batch.append({"image": image, "height": 96, "width": 96, "instances": instances})
    return batch


@pytest.mark.parametrize("loss_name", ["eqlv2_2c_softmax", "softmax", "sigmoid"])
def test_real_training_steps_collect_statistics_and_the_hook_reports_them(loss_name):
    """Two detectron2 SimpleTrainer iterations of the tiny model: finite losses, the classifier
    trains, every loss accumulates statistics and the hook summarises them."""
    from detectron2.engine import SimpleTrainer

    from eqlv2.engine.hooks import GradientStatisticsHook

    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.EQLV2.LOSS", loss_name, "MODEL.MASK_ON", False))
    model.train()
    predictor = model.roi_heads.box_predictor
    before = predictor.cls_score.weight.detach().clone()
    batch = _synthetic_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = SimpleTrainer(model, iter([batch, batch]), optimizer)
    hook = GradientStatisticsHook(period=2, frequency_groups=["r", "c", "c", "f", "f"])
    trainer.register_hooks([hook])
    trainer.train(0, 2)
    latest = {k: v for k, (v, _) in trainer.storage.latest().items()}
    assert math.isfinite(latest["loss_cls"]) and latest["loss_cls"] > 0
    assert 0.0 <= latest["fast_rcnn/cls_accuracy"] <= 1.0
    after = predictor.cls_score.weight.detach()
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    loss = predictor.classification_loss
    assert int(loss.num_updates) == 2 and float(loss.neg_grad.sum()) > 0
    ratio = (loss.pos_grad / (loss.neg_grad + 1e-10)).numpy()
    assert latest["eqlv2/ratio_mean"] == pytest.approx(ratio.mean())
    assert latest["eqlv2/ratio_mean_c"] == pytest.approx(ratio[1:3].mean())
    assert ("eqlv2/q_mean" in latest) == loss_name.startswith("eqlv2")
    if loss_name == "eqlv2_2c_softmax":  # both blocks of the pair classifier train
        assert not torch.equal(after[6:], before[6:]) and not torch.equal(after[:6], before[:6])


def test_baseline_snapshot_has_statistics_without_weights():
    from eqlv2.losses.statistics import GradientStatistics, summarize

    model = build_model(tiny_cfg("MODEL.EQLV2.LOSS", "softmax"))
    loss = classification_losses(model)[0]
    _train_classifier_steps(loss, 2)
    stats = GradientStatistics.from_loss(loss)
    assert stats.q is None and stats.r is None and list(stats.as_columns()) == ["pos_grad", "neg_grad", "ratio"]
    np.testing.assert_allclose(stats.ratio, (loss.pos_grad / (loss.neg_grad + 1e-10)).numpy())
    assert set(summarize(stats, ["r", "r", "c", "f", "f"])) == {
        "eqlv2/ratio_mean", "eqlv2/ratio_mean_r", "eqlv2/ratio_mean_c", "eqlv2/ratio_mean_f"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("opts", "pattern"),
    [
        (("MODEL.EQLV2.LOSS", "nonsense"),
         r"MODEL\.EQLV2\.LOSS='nonsense'.*allowed values: eqlv2, softmax, sigmoid, eqlv1, federated, eqlv2_2c_softmax"),
        (("MODEL.EQLV2.GAMMA", -1.0), r"MODEL\.EQLV2\.GAMMA=-1\.0.*gamma must be > 0"),
        (("MODEL.EQLV2.LOSS", "eqlv2_2c_softmax", "MODEL.EQLV2.ALPHA", -2.0), r"MODEL\.EQLV2\.ALPHA=-2\.0"),
        (("MODEL.EQLV2.MU", float("nan")), r"MODEL\.EQLV2\.MU=nan"),
    ],
)
def test_bad_loss_config_is_named_when_the_model_is_built(opts, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_model(tiny_cfg(*opts))


def test_two_class_softmax_config_inherits_the_base():
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    cfg.merge_from_file("configs/LVISv1/mask_rcnn_R_50_FPN_1x_eqlv2_2c_softmax.yaml")
    assert cfg.MODEL.EQLV2.LOSS == "eqlv2_2c_softmax" and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1203
    assert (cfg.MODEL.EQLV2.GAMMA, cfg.MODEL.EQLV2.MU, cfg.MODEL.EQLV2.ALPHA) == (12.0, 0.8, 4.0)


@pytest.mark.parametrize("heads", ["EQLv2StandardROIHeads", "EQLv2CascadeROIHeads"])
def test_two_class_softmax_model_detects_in_eval_mode(heads):
    """detectron2's inference path (predict_probs, NMS, mask head) runs on the 2C classifier."""
    torch.manual_seed(0)
    cfg = tiny_cfg("MODEL.EQLV2.LOSS", "eqlv2_2c_softmax", "MODEL.ROI_HEADS.NAME", heads,
                   "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", heads == "EQLv2CascadeROIHeads")
    model = build_model(cfg).eval()
    image = torch.randint(0, 255, (3, 96, 96)).float()
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 96, "width": 96}])
    instances = output["instances"]
    assert len(instances) > 0 and instances.pred_classes.max() < 5
    assert torch.all((instances.scores > 0) & (instances.scores <= 1))
    assert instances.pred_masks.shape[1:] == (96, 96)
