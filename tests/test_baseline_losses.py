"""Baseline losses, the factory and the shared input checks, against independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eqlv2.losses import (
    LOSS_NAMES,
    ClassificationLoss,
    EQLv1Loss,
    EQLv2Loss,
    EQLv2TwoClassSoftmaxLoss,
    FederatedSigmoidLoss,
    SigmoidBCELoss,
    SoftmaxCELoss,
    build_classification_loss,
    sigmoid_bias_init,
)

NUM_CLASSES = 7


def random_batch(n=40, num_classes=NUM_CLASSES, seed=0, background=0.6):
    """float64 numpy logits (n, C+1) and labels (n,) in [0, C]."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(n) < background, num_classes, rng.integers(0, num_classes, n))
    logits = rng.normal(0.0, 2.0, size=(n, num_classes + 1))
    return logits, labels


def loss_and_grad(crit, logits, labels, dtype=torch.float64):
    z = torch.tensor(logits, dtype=dtype, requires_grad=True)
    loss = crit(z, torch.tensor(labels))
    loss.backward()
    return float(loss.detach()), z.grad.double().numpy()


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def bce(z, y):
    """Elementwise -[y log p + (1-y) log(1-p)] written with log p = -log(1 + e^-z)."""
    return y * np.log1p(np.exp(-z)) + (1.0 - y) * np.log1p(np.exp(z))


def one_hot(labels, width):
    y = np.zeros((len(labels), width))
    y[np.arange(len(labels)), labels] = 1.0
    return y


# --------------------------------------------------------------------------- softmax
def test_softmax_matches_manual_log_softmax():
    logits, labels = random_batch()
    loss, grad = loss_and_grad(SoftmaxCELoss(NUM_CLASSES), logits, labels)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    expected = -np.mean([log_softmax[i, labels[i]] for i in range(n)])
    assert loss == pytest.approx(expected, rel=1e-12)
    expected_grad = (np.exp(log_softmax) - one_hot(labels, NUM_CLASSES + 1)) / n
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-15)
    scores = SoftmaxCELoss(NUM_CLASSES).scores(torch.tensor(logits)).numpy()
    np.testing.assert_allclose(scores, np.exp(log_softmax)[:, :NUM_CLASSES], rtol=1e-12)


# --------------------------------------------------------------------------- sigmoid
def test_sigmoid_matches_manual_bce_over_category_columns():
    logits, labels = random_batch(seed=1)
    n = len(labels)
    loss, grad = loss_and_grad(SigmoidBCELoss(NUM_CLASSES), logits, labels)
    y = one_hot(labels, NUM_CLASSES + 1)[:, :NUM_CLASSES]  # background rows: all zeros
    z = logits[:, :NUM_CLASSES]
    assert loss == pytest.approx(bce(z, y).sum() / n, rel=1e-12)
    np.testing.assert_allclose(grad[:, :NUM_CLASSES], (sigmoid(z) - y) / n, rtol=1e-10, atol=1e-16)
    assert np.all(grad[:, NUM_CLASSES] == 0.0)
    scores = SigmoidBCELoss(NUM_CLASSES).scores(torch.tensor(logits)).numpy()
    np.testing.assert_allclose(scores, sigmoid(z), rtol=1e-12)


def test_sigmoid_with_agnostic_task_trains_the_background_column():
    logits, labels = random_batch(seed=2)
    n = len(labels)
    crit = SigmoidBCELoss(NUM_CLASSES, use_agnostic=True)
    loss, grad = loss_and_grad(crit, logits, labels)
    y = one_hot(labels, NUM_CLASSES + 1)  # y[:, C] = 1 on background rows
    assert loss == pytest.approx(bce(logits, y).sum() / n, rel=1e-12)
    np.testing.assert_allclose(grad, (sigmoid(logits) - y) / n, rtol=1e-10, atol=1e-16)
    expected_scores = sigmoid(logits[:, :NUM_CLASSES]) * (1.0 - sigmoid(logits[:, NUM_CLASSES:]))
    np.testing.assert_allclose(crit.scores(torch.tensor(logits)).numpy(), expected_scores, rtol=1e-12)
    # EQL v2 with both reweighings off is the same loss, step after step
    eqlv2 = EQLv2Loss(NUM_CLASSES, neg_down_weight=False, pos_up_weight=False)
    for seed in range(3):
        batch = random_batch(seed=10 + seed)
        assert loss_and_grad(eqlv2, *batch)[0] == pytest.approx(loss_and_grad(crit, *batch)[0], rel=1e-13)


def test_sigmoid_float32_and_bfloat16():
    logits, labels = random_batch(seed=3)
    expected, _ = loss_and_grad(SigmoidBCELoss(NUM_CLASSES), logits, labels)
    loss32, grad32 = loss_and_grad(SigmoidBCELoss(NUM_CLASSES), logits, labels, torch.float32)
    assert loss32 == pytest.approx(expected, rel=1e-5)
    z16 = torch.tensor(logits, dtype=torch.bfloat16, requires_grad=True)
    loss16 = SigmoidBCELoss(NUM_CLASSES)(z16, torch.tensor(labels))
    loss16.backward()
    assert loss16.dtype == torch.float32 and z16.grad.dtype == torch.bfloat16
    expected16, _ = loss_and_grad(SigmoidBCELoss(NUM_CLASSES), z16.detach().double().numpy(), labels)
    assert float(loss16.detach()) == pytest.approx(expected16, rel=1e-5)


# --------------------------------------------------------------------------- EQL v1
def test_eqlv1_zeroes_tail_negatives_of_foreground_proposals():
    num_classes = 4
    # lambda_ = 1.76e-3: categories 1 and 3 are tail categories
    frequencies = torch.tensor([0.5, 1e-4, 0.01, 1.0e-3], dtype=torch.float64)
    crit = EQLv1Loss(num_classes, frequencies)
    assert crit.tail_classes.tolist() == [False, True, False, True]
    labels = np.array([0, 1, 4, 2, 3])  # rows 0, 1, 3, 4 foreground; row 2 background
    logits = np.random.default_rng(4).normal(0.0, 2.0, size=(5, num_classes + 1))
    loss, grad = loss_and_grad(crit, logits, labels)

    zeroed = {(0, 1), (0, 3), (1, 3), (3, 1), (3, 3), (4, 1)}  # tail negatives of fg rows
    weights = np.ones((5, num_classes))
    for i, j in zeroed:
        weights[i, j] = 0.0
    y = one_hot(labels, num_classes + 1)[:, :num_classes]
    z = logits[:, :num_classes]
    assert loss == pytest.approx((weights * bce(z, y)).sum() / 5, rel=1e-12)
    for i in range(5):
        for j in range(num_classes):
            if (i, j) in zeroed:
                assert grad[i, j] == 0.0, (i, j)
            else:
                assert grad[i, j] == pytest.approx((sigmoid(z[i, j]) - y[i, j]) / 5, rel=1e-10)
    assert np.all(grad[:, num_classes] == 0.0)
    # the tail positive (row 1, column 1) and the background row's tail negatives still train
    assert grad[1, 1] < 0 and grad[2, 1] > 0 and grad[2, 3] > 0
    np.testing.assert_allclose(crit.scores(torch.tensor(logits)).numpy(), sigmoid(z), rtol=1e-12)


def test_eqlv1_without_tail_classes_is_plain_sigmoid():
    logits, labels = random_batch(seed=5)
    frequencies = torch.full((NUM_CLASSES,), 0.5)
    loss_v1, grad_v1 = loss_and_grad(EQLv1Loss(NUM_CLASSES, frequencies), logits, labels)
    loss_bce, grad_bce = loss_and_grad(SigmoidBCELoss(NUM_CLASSES), logits, labels)
    assert loss_v1 == pytest.approx(loss_bce, rel=1e-12)
    np.testing.assert_allclose(grad_v1, grad_bce, rtol=1e-10, atol=1e-16)


# --------------------------------------------------------------------------- federated
def test_federated_uses_gt_classes_plus_samples_and_nothing_else():
    num_classes, sampled = 30, 10
    weights = torch.arange(1, num_classes + 1, dtype=torch.float64) ** 0.5
    crit = FederatedSigmoidLoss(num_classes, weights, num_sampled_classes=sampled)
    for seed in range(5):
        logits, labels = random_batch(n=25, num_classes=num_classes, seed=seed, background=0.8)
        loss, grad = loss_and_grad(crit, logits, labels)
        used = crit.last_selected_classes.tolist()
        gt = {int(c) for c in labels if c < num_classes}
        assert len(used) == len(set(used)) == sampled
        assert gt <= set(used) and all(0 <= c < num_classes for c in used)
        mask = np.zeros(num_classes + 1, dtype=bool)
        mask[used] = True
        assert np.all(grad[:, ~mask] == 0.0)
        assert np.all(grad[:, mask] != 0.0)
        y = one_hot(labels, num_classes + 1)
        expected = bce(logits[:, used], y[:, used]).sum() / len(labels)
        assert loss == pytest.approx(expected, rel=1e-12)
        np.testing.assert_allclose(grad[:, used], (sigmoid(logits[:, used]) - y[:, used]) / len(labels),
                                   rtol=1e-10, atol=1e-16)


def test_federated_never_samples_zero_weight_classes_and_keeps_all_gt():
    num_classes = 12
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[[2, 5, 7]] = 1.0
    crit = FederatedSigmoidLoss(num_classes, weights, num_sampled_classes=6)
    labels = torch.tensor([0, 11, 12, 12])
    for _ in range(10):
        used = set(crit.select_classes(labels).tolist())
        assert used == {0, 11, 2, 5, 7}  # fewer than 6: only 3 classes can be sampled
    many = FederatedSigmoidLoss(num_classes, torch.ones(num_classes), num_sampled_classes=3)
    labels = torch.tensor([0, 1, 2, 3, 4, 12])
    assert sorted(many.select_classes(labels).tolist()) == [0, 1, 2, 3, 4]


def test_federated_sampling_follows_the_weights_and_generator():
    num_classes = 6
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1000.0])
    crit = FederatedSigmoidLoss(num_classes, weights, num_sampled_classes=2,
                                generator=torch.Generator().manual_seed(0))
    background_only = torch.full((4,), num_classes)
    picks = [set(crit.select_classes(background_only).tolist()) for _ in range(200)]
    assert sum(5 in p for p in picks) >= 190
    a = FederatedSigmoidLoss(num_classes, torch.ones(6), 3, generator=torch.Generator().manual_seed(3))
    b = FederatedSigmoidLoss(num_classes, torch.ones(6), 3, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a.select_classes(background_only), b.select_classes(background_only))
               for _ in range(5))


# --------------------------------------------------------------------------- factory, helpers
def build_all(num_classes=NUM_CLASSES):
    return {
        name: build_classification_loss(
            name, num_classes,
            **({"image_frequencies": torch.full((num_classes,), 0.01)} if name == "eqlv1" else {}),
            **({"class_weights": torch.ones(num_classes)} if name == "federated" else {}),
        )
        for name in LOSS_NAMES
    }


def test_factory_builds_every_loss():
    losses = build_all()
    assert set(LOSS_NAMES) == {"eqlv2", "softmax", "sigmoid", "eqlv1", "federated", "eqlv2_2c_softmax"}
    expected = {"eqlv2": EQLv2Loss, "softmax": SoftmaxCELoss, "sigmoid": SigmoidBCELoss,
                "eqlv1": EQLv1Loss, "federated": FederatedSigmoidLoss,
                "eqlv2_2c_softmax": EQLv2TwoClassSoftmaxLoss}
    for name, loss in losses.items():
        assert type(loss) is expected[name] and isinstance(loss, ClassificationLoss)
        assert loss.num_classes == NUM_CLASSES
    built = build_classification_loss("eqlv2", 3, gamma=6.0, use_agnostic=False)
    assert built.gamma == 6.0 and not built.use_agnostic
    assert build_classification_loss("sigmoid", 3, use_agnostic=True).use_agnostic


def test_factory_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"eqlv2, softmax, sigmoid, eqlv1, federated, eqlv2_2c_softmax.*'focal'"):
        build_classification_loss("focal", 3)
    with pytest.raises(ValueError, match=r"image_frequencies"):
        build_classification_loss("eqlv1", 3)
    with pytest.raises(ValueError, match=r"class_weights"):
        build_classification_loss("federated", 3, num_sampled_classes=2)
    with pytest.raises(ValueError, match=r"gama"):
        build_classification_loss("eqlv2", 3, gama=1.0)
    with pytest.raises(ValueError, match=r"gamma.*-2"):
        build_classification_loss("eqlv2", 3, gamma=-2.0)


def test_sigmoid_bias_init():
    bias = sigmoid_bias_init(0.001)
    assert bias == pytest.approx(-math.log(999.0), rel=1e-15)
    assert 1.0 / (1.0 + math.exp(-bias)) == pytest.approx(0.001, rel=1e-12)
    assert sigmoid_bias_init(0.5) == 0.0
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"prior_prob"):
            sigmoid_bias_init(bad)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_validates_inputs(name):
    crit = build_all()[name]
    width = crit.num_logits
    with pytest.raises(ValueError, match=r"logits.*\(4, 7\)"):
        crit(torch.zeros(4, NUM_CLASSES), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"logits.*\({width},\)"):
        crit(torch.zeros(width), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels.*\(3,\)"):
        crit(torch.zeros(4, width), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels.*8"):
        crit(torch.zeros(2, width), torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"labels.*-2"):
        crit(torch.zeros(2, width), torch.tensor([-2, 0]))
    with pytest.raises(ValueError, match=rf"logits.*\(4, {width + 1}\)"):
        crit.scores(torch.zeros(4, width + 1))
    z = torch.randn(5, width, requires_grad=True)
    loss = crit(z, torch.tensor([0, 1, NUM_CLASSES, NUM_CLASSES, 6]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert crit.scores(z.detach()).shape == (5, NUM_CLASSES)
    empty = crit(torch.zeros(0, width), torch.zeros(0, dtype=torch.long))
    assert float(empty) == 0.0


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: SoftmaxCELoss(0), r"num_classes.*0"),
        (lambda: SigmoidBCELoss(-1), r"num_classes.*-1"),
        (lambda: EQLv1Loss(3, torch.ones(4)), r"image_frequencies.*\(4,\)"),
        (lambda: EQLv1Loss(3, torch.tensor([0.1, -0.1, 0.2])), r"image_frequencies.*-0\.1"),
        (lambda: EQLv1Loss(3, torch.tensor([0.1, 1.5, 0.2])), r"image_frequencies.*1\.5"),
        (lambda: EQLv1Loss(3, torch.tensor([0.1, float("nan"), 0.2])), r"image_frequencies"),
        (lambda: EQLv1Loss(3, torch.ones(3), lambda_=-1e-3), r"lambda_.*-0\.001"),
        (lambda: EQLv1Loss(3, torch.ones(3), lambda_=float("nan")), r"lambda_.*nan"),
        (lambda: FederatedSigmoidLoss(3, torch.ones(2)), r"class_weights.*\(2,\)"),
        (lambda: FederatedSigmoidLoss(3, torch.tensor([1.0, -2.0, 1.0])), r"class_weights.*-2"),
        (lambda: FederatedSigmoidLoss(3, torch.ones(3), 0), r"num_sampled_classes.*0"),
        (lambda: FederatedSigmoidLoss(3, [1.0, 1.0, 1.0]), r"class_weights.*list"),
    ],
)
def test_bad_constructor_arguments_raise(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()


# --------------------------------------------------------------------------- gradient statistics
def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class ReferenceStatistics:
    """Per category j < C: sum of |G_ij| over rows labelled j and over the other rows, where G is
    N times the gradient of the batch loss w.r.t. the logits (the per-row loss's gradient)."""

    def __init__(self, num_classes):
        self.c = num_classes
        self.pos_grad = np.zeros(num_classes)
        self.neg_grad = np.zeros(num_classes)

    def add(self, row_gradients, labels):
        for j in range(self.c):
            positive = labels == j
            self.pos_grad[j] += np.abs(row_gradients[positive, j]).sum()
            self.neg_grad[j] += np.abs(row_gradients[~positive, j]).sum()


def softmax_row_gradients(crit, z, labels):
    return softmax(z) - one_hot(labels, z.shape[1])


def sigmoid_row_gradients(crit, z, labels):
    return sigmoid(z) - one_hot(labels, z.shape[1])  # columns < C: target 0 on background rows


def eqlv1_row_gradients(crit, z, labels):
    c = crit.num_classes
    tail = crit.image_frequencies.numpy() < crit.lambda_
    y = one_hot(labels, c + 1)
    weights = np.ones_like(z)
    for i, label in enumerate(labels):
        if label < c:
            weights[i, :c] = np.where(tail & (y[i, :c] == 0.0), 0.0, 1.0)
    return weights * (sigmoid(z) - y)


def federated_row_gradients(crit, z, labels):
    mask = np.zeros(z.shape[1])
    mask[crit.last_selected_classes.numpy()] = 1.0
    return mask * (sigmoid(z) - one_hot(labels, z.shape[1]))


BASELINES = {
    "softmax": (lambda: SoftmaxCELoss(NUM_CLASSES), softmax_row_gradients),
    "sigmoid": (lambda: SigmoidBCELoss(NUM_CLASSES), sigmoid_row_gradients),
    "sigmoid_agnostic": (lambda: SigmoidBCELoss(NUM_CLASSES, use_agnostic=True), sigmoid_row_gradients),
    "eqlv1": (lambda: EQLv1Loss(NUM_CLASSES, torch.tensor([0.5, 1e-4, 0.01, 1e-3, 0.2, 1e-5, 0.3])),
              eqlv1_row_gradients),
    "federated": (lambda: FederatedSigmoidLoss(NUM_CLASSES, torch.ones(NUM_CLASSES), num_sampled_classes=4,
                                               generator=torch.Generator().manual_seed(0)),
                  federated_row_gradients),
}


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_statistics_match_reference(name):
    build, row_gradients = BASELINES[name]
    crit, reference = build(), ReferenceStatistics(NUM_CLASSES)
    if name == "eqlv1":
        assert crit.tail_classes.tolist() == [False, True, False, True, False, True, False]
    for step in range(6):
        logits, labels = random_batch(n=30 + step, seed=100 + step, background=0.5)
        loss_and_grad(crit, logits, labels)
        reference.add(row_gradients(crit, logits, labels), labels)
        np.testing.assert_allclose(crit.pos_grad.numpy(), reference.pos_grad, rtol=1e-12, atol=0)
        np.testing.assert_allclose(crit.neg_grad.numpy(), reference.neg_grad, rtol=1e-12, atol=0)
    assert int(crit.num_updates) == 6 and crit.pos_grad.dtype == torch.float64
    assert np.all(reference.pos_grad > 0) and np.all(reference.neg_grad > 0)
    ratio = reference.pos_grad / (reference.neg_grad + 1e-10)
    np.testing.assert_allclose(crit.gradient_ratio().numpy(), ratio, rtol=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_statistics_are_the_gradient_magnitudes_of_every_loss(name):
    """pos/neg_grad = N |d loss / d z_ij| of the category logits (the positive block for 2C),
    summed per category over its positive and negative rows, for the gradient autograd gives."""
    crit, reference = build_all()[name], ReferenceStatistics(NUM_CLASSES)
    for step in range(4):
        rng = np.random.default_rng(step)
        labels = np.where(rng.random(25) < 0.5, NUM_CLASSES, rng.integers(0, NUM_CLASSES, 25))
        logits = rng.normal(0.0, 2.0, size=(25, crit.num_logits))
        _, grad = loss_and_grad(crit, logits, labels)
        reference.add(len(labels) * grad, labels)
    np.testing.assert_allclose(crit.pos_grad.numpy(), reference.pos_grad, rtol=1e-10, atol=0)
    np.testing.assert_allclose(crit.neg_grad.numpy(), reference.neg_grad, rtol=1e-10, atol=0)
    assert reference.neg_grad.sum() > 0


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_statistics_stay_float64_and_eval_mode_leaves_them(name):
    crit = build_all()[name].half()
    assert crit.pos_grad.dtype == crit.neg_grad.dtype == torch.float64
    assert {"pos_grad", "neg_grad", "num_updates"} <= set(crit.state_dict())
    crit.eval()
    z = torch.randn(6, crit.num_logits, requires_grad=True)
    crit(z, torch.tensor([0, 1, 2, 7, 7, 7])).backward()
    assert int(crit.num_updates) == 0 and float(crit.neg_grad.sum()) == 0.0


def test_softmax_is_torch_cross_entropy_in_every_precision():
    logits, labels = random_batch(seed=8)
    for dtype, rtol in ((torch.float64, 1e-13), (torch.float32, 1e-6), (torch.bfloat16, 1e-6)):
        z = torch.tensor(logits, dtype=dtype, requires_grad=True)
        z_ref = z.detach().double().requires_grad_(True)
        loss = SoftmaxCELoss(NUM_CLASSES)(z, torch.tensor(labels))
        loss.backward()
        expected = torch.nn.functional.cross_entropy(z_ref, torch.tensor(labels))
        expected.backward()
        assert z.grad.dtype == dtype
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=rtol)
        if dtype != torch.bfloat16:
            np.testing.assert_allclose(z.grad.double().numpy(), z_ref.grad.numpy(), rtol=rtol * 10, atol=1e-9)
