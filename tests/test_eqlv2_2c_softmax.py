"""EQL v2 with the 2C-softmax classifier (section 4.8) against an independent float64 reference.

The reference writes each task's two-way softmax out with explicit exponentials over the pair
(positive logit a_k in column k, "others" logit b_k in column C+1+k), the cross-entropy of every
entry, the analytic gradients w.r.t. both logits of the pair, and the statistics of eq. 3-4, 7-9
as loops over the categories; the weights q, r come from the C-sigmoid reference of
``test_eqlv2_loss``. It shares no code with ``eqlv2.losses``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_eqlv2_loss import (  # the C-sigmoid test's helpers
    ReferenceEQLv2,
    assert_close,
    compare_steps,
    run_step,
)
from test_eqlv2_loss import make_batches as sigmoid_batches

from eqlv2.losses import EQLv2Loss, EQLv2TwoClassSoftmaxLoss, build_classification_loss

NUM_CLASSES = 9
WIDTH = NUM_CLASSES + 1  # tasks: C categories and the agnostic task


class ReferenceTwoClassSoftmax(ReferenceEQLv2):
    """numpy 2C-softmax EQL v2: pair softmax, dense targets and weights, explicit sums.

    The weights q, r (eq. 5, 6, 9) are the C-sigmoid reference's; the loss, gradients and
    statistics are written out for the pair softmax here.
    """

    @staticmethod
    def pair_softmax(a, b):
        """p = e^a / (e^a + e^b) and its log and log(1-p), shifted by max(a, b) for stability."""
        m = np.maximum(a, b)
        ea, eb = np.exp(a - m), np.exp(b - m)
        log_total = m + np.log(ea + eb)
        return ea / (ea + eb), a - log_total, b - log_total

    def step(self, logits, labels, train=True):
        """Loss and gradient (N, 2(C+1)) of a batch; updates the statistics if ``train``."""
        z = np.asarray(logits, dtype=np.float64)
        n, k = z.shape[0], self.num_classes + 1
        a, b = z[:, :k], z[:, k:]
        y = np.zeros((n, k))
        y[np.arange(n), labels] = 1.0
        w = self.entry_weights(y)
        p, log_p, log_not_p = self.pair_softmax(a, b)
        ce = -(y * log_p + (1.0 - y) * log_not_p)
        loss = float((w * ce).sum() / n)
        grad_a = w * (p - y) / n  # d/da of -[y log p + (1-y) log(1-p)]
        grad_b = -w * (p - y) / n  # = -d/da
        if train:
            self.accumulate(p, y, w)  # |d (w CE) / d a| = w (1 - p) on positives, w p on negatives
        return loss, np.concatenate([grad_a, grad_b], axis=1)

    def scores(self, logits):
        z = np.asarray(logits, dtype=np.float64)
        p, _, _ = self.pair_softmax(z[:, :WIDTH], z[:, WIDTH:])
        out = p[:, : self.num_classes]
        return out * (1.0 - p[:, self.num_classes :]) if self.use_agnostic else out


def make_batches(num_steps, seed):
    """The C-sigmoid test's batches (long-tailed, 70% background) as the positive logits, and
    random "others" logits: (logits (n, 2(C+1)), labels (n,)) numpy batches."""
    rng = np.random.default_rng(seed + 1000)
    return [
        (np.concatenate([positive, rng.normal(0.0, 1.0, size=positive.shape)], axis=1), labels)
        for positive, labels in sigmoid_batches(num_steps, seed, num_classes=NUM_CLASSES)
    ]


ABLATIONS = [
    {},
    {"pos_up_weight": False},
    {"pos_up_weight": False, "neg_down_weight": False},
    {"use_agnostic": False},
    {"gamma": 6.0, "mu": 0.5, "alpha": 2.0},
]


def ablation_id(kwargs):
    return ",".join(f"{a}={b}" for a, b in kwargs.items()) or "default"


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kwargs", ABLATIONS, ids=ablation_id)
def test_loss_gradients_and_statistics_match_reference(kwargs, dtype, rtol):
    crit = EQLv2TwoClassSoftmaxLoss(NUM_CLASSES, **kwargs)
    reference = ReferenceTwoClassSoftmax(NUM_CLASSES, **kwargs)
    compare_steps(crit, reference, make_batches(20, seed=0), dtype, rtol)
    if kwargs == {}:  # the comparison is only meaningful if the weights moved
        q, r = reference.weights()
        assert np.any((r > 0.05) & (r < 0.95)) and np.any(q > 4.5) and np.any(q < 3.5), (q, r)


def test_scores_are_pair_softmax_probabilities_times_objectness():
    logits = np.random.default_rng(3).normal(0.0, 3.0, size=(11, 2 * WIDTH))
    for use_agnostic in (True, False):
        crit = EQLv2TwoClassSoftmaxLoss(NUM_CLASSES, use_agnostic=use_agnostic)
        expected = ReferenceTwoClassSoftmax(NUM_CLASSES, use_agnostic=use_agnostic).scores(logits)
        scores = crit.scores(torch.tensor(logits))
        assert scores.shape == (11, NUM_CLASSES)
        assert_close(scores, expected, 1e-12, f"scores (use_agnostic={use_agnostic})")


def test_equals_sigmoid_eqlv2_on_the_logit_differences():
    """Pair softmax = sigmoid(a - b): with b = 0 the 2C loss is the C-sigmoid loss, step by step."""
    two_c, sigmoid = EQLv2TwoClassSoftmaxLoss(NUM_CLASSES), EQLv2Loss(NUM_CLASSES)
    for logits, labels in make_batches(8, seed=4):
        logits[:, WIDTH:] = 0.0
        loss_2c, grad_2c = run_step(two_c, logits, labels)
        loss_1c, grad_1c = run_step(sigmoid, logits[:, :WIDTH], labels)
        assert loss_2c == pytest.approx(loss_1c, rel=1e-13)
        assert_close(grad_2c[:, :WIDTH], grad_1c, 1e-13, "positive-logit gradient")
        assert_close(grad_2c[:, WIDTH:], -grad_1c, 1e-13, "others-logit gradient")
    assert_close(two_c.pos_grad, sigmoid.pos_grad, 1e-13, "pos_grad")
    assert_close(two_c.neg_grad, sigmoid.neg_grad, 1e-13, "neg_grad")


def test_eval_mode_and_state_dict():
    batches = make_batches(8, seed=5)
    crit = EQLv2TwoClassSoftmaxLoss(NUM_CLASSES)
    for logits, labels in batches[:4]:
        run_step(crit, logits, labels)
    state = copy.deepcopy(crit.state_dict())
    crit.eval()
    run_step(crit, *batches[4])
    assert all(torch.equal(value, state[name]) for name, value in crit.state_dict().items())
    restored = EQLv2TwoClassSoftmaxLoss(NUM_CLASSES)
    restored.load_state_dict(state)
    crit.train()
    for logits, labels in batches[5:]:
        (loss_a, grad_a), (loss_b, grad_b) = run_step(crit, logits, labels), run_step(restored, logits, labels)
        assert loss_a == loss_b and np.array_equal(grad_a, grad_b)
    assert torch.equal(crit.neg_grad, restored.neg_grad)


def test_layout_helpers():
    crit = build_classification_loss("eqlv2_2c_softmax", NUM_CLASSES, alpha=2.0)
    assert isinstance(crit, EQLv2TwoClassSoftmaxLoss) and crit.alpha == 2.0
    assert crit.num_logits == 2 * WIDTH
    bias = crit.initial_bias(0.01)
    p, _, _ = ReferenceTwoClassSoftmax.pair_softmax(bias[:WIDTH].numpy(), bias[WIDTH:].numpy())
    np.testing.assert_allclose(p, 0.01, rtol=1e-12)
    weight = torch.arange(2 * WIDTH * 3, dtype=torch.float64).view(2 * WIDTH, 3)
    rows = crit.category_weight_rows(weight)
    assert torch.equal(rows, weight[:NUM_CLASSES] - weight[WIDTH : WIDTH + NUM_CLASSES])
    with pytest.raises(ValueError, match=r"logits.*2\(C\+1\).*20.*\(4, 10\)"):
        crit(torch.zeros(4, WIDTH), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits.*\(3, 10\)"):
        crit.scores(torch.zeros(3, WIDTH))
