"""EQL v2 against an independent float64 transcription of eq. 3-10 of the paper.

The reference below builds the dense one-hot targets and weight matrix explicitly and loops over
the categories; it shares no code with ``eqlv2.losses``.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eqlv2.losses import EQLv2Loss

NUM_CLASSES = 12
EPS = 1e-10  # the authors' epsilon in eq. 9
SWITCHES = ("use_agnostic", "neg_down_weight", "pos_up_weight")


# --------------------------------------------------------------------------- reference
class ReferenceEQLv2:
    """Plain numpy EQL v2: dense targets / weights, explicit positive and negative sums."""

    def __init__(self, num_classes, gamma=12.0, mu=0.8, alpha=4.0, use_agnostic=True,
                 neg_down_weight=True, pos_up_weight=True):
        self.num_classes = num_classes
        self.gamma, self.mu, self.alpha = gamma, mu, alpha
        self.use_agnostic = use_agnostic
        self.neg_down_weight = neg_down_weight
        self.pos_up_weight = pos_up_weight
        self.pos_grad = np.zeros(num_classes)
        self.neg_grad = np.zeros(num_classes)
        self.steps = 0

    def weights(self):
        """q, r of eq. 5, each (C,)."""
        if self.steps == 0:
            return np.ones(self.num_classes), np.ones(self.num_classes)
        g = self.pos_grad / (self.neg_grad + EPS)  # eq. 9
        f = 1.0 / (1.0 + np.exp(-self.gamma * (g - self.mu)))  # eq. 6
        q = 1.0 + self.alpha * (1.0 - f) if self.pos_up_weight else np.ones(self.num_classes)
        r = f if self.neg_down_weight else np.ones(self.num_classes)
        return q, r

    def step(self, logits, labels, train=True):
        """Loss and analytic gradient w * (p - y) / N of one batch; updates the sums if train."""
        z = np.asarray(logits, dtype=np.float64)
        n, width = z.shape
        y = np.zeros((n, width))
        for i, label in enumerate(labels):
            y[i, label] = 1.0  # background rows: y[:, C] = 1 (the objectness task's target)
        w = self.entry_weights(y)
        p = np.exp(-np.logaddexp(0.0, -z))  # sigmoid(z), without overflow
        bce = np.logaddexp(0.0, z) - y * z
        loss = float((w * bce).sum() / n)
        grad = w * (p - y) / n
        if train:
            self.accumulate(p, y, w)
        return loss, grad

    def entry_weights(self, y):
        """(N, C+1) weight of every entry: q_j on positives, r_j on negatives, 1 or 0 for column C."""
        q, r = self.weights()
        w = np.zeros(y.shape)
        for j in range(self.num_classes):
            w[:, j] = np.where(y[:, j] == 1.0, q[j], r[j])
        w[:, self.num_classes] = 1.0 if self.use_agnostic else 0.0
        return w

    def accumulate(self, p, y, w):
        """Adds the reweighed gradient magnitudes w |p - y| of eq. 3-4, 7-8 per category, counts a step."""
        for j in range(self.num_classes):
            positive = y[:, j] == 1.0
            self.pos_grad[j] += np.sum(np.abs(p[positive, j] - 1.0) * w[positive, j])  # eq. 3, 7
            self.neg_grad[j] += np.sum(np.abs(p[~positive, j]) * w[~positive, j])  # eq. 4, 8
        self.steps += 1


def make_batches(num_steps, seed, num_classes=NUM_CLASSES):
    """Random (logits, labels) numpy batches: 5-60 rows, 70% background, long-tailed classes."""
    rng = np.random.default_rng(seed)
    class_probs = 1.0 / (np.arange(num_classes) + 1.0) ** 2
    class_probs /= class_probs.sum()
    batches = []
    for _ in range(num_steps):
        n = int(rng.integers(5, 61))
        labels = np.where(rng.random(n) < 0.7, num_classes,
                          rng.choice(num_classes, size=n, p=class_probs))
        logits = rng.normal(-1.5, 1.5, size=(n, num_classes + 1))
        logits[np.arange(n), labels] += 3.0
        batches.append((logits, labels))
    return batches


def run_step(crit, logits, labels, dtype=torch.float64):
    """Loss (float) and d loss / d logits (float64 numpy) of ``crit`` on one numpy batch."""
    z = torch.tensor(logits, dtype=dtype, requires_grad=True)
    loss = crit(z, torch.tensor(labels))
    loss.backward()
    return float(loss.detach()), z.grad.double().numpy()


def assert_close(actual, expected, rtol, what):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = max(np.abs(expected).max(initial=0.0), 1e-300)
    err = np.abs(actual - expected).max(initial=0.0) / scale
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def compare_steps(crit, reference, batches, dtype, rtol):
    """Trains ``crit`` and ``reference`` on the same batches; q, r, loss, gradient and the
    statistics must agree at every step."""
    for step, (logits, labels) in enumerate(batches):
        logits = torch.tensor(logits, dtype=dtype).double().numpy()  # what crit actually sees
        q, r = crit.current_weights()
        q_ref, r_ref = reference.weights()
        assert_close(q, q_ref, rtol, f"q at step {step}")
        assert_close(r, r_ref, rtol, f"r at step {step}")
        loss, grad = run_step(crit, logits, labels, dtype)
        loss_ref, grad_ref = reference.step(logits, labels)
        assert_close(loss, loss_ref, rtol, f"loss at step {step}")
        # elementwise, relative to the largest gradient entry of the batch
        assert_close(grad, grad_ref, rtol, f"gradient at step {step}")
        assert_close(crit.pos_grad, reference.pos_grad, rtol, f"pos_grad at step {step}")
        assert_close(crit.neg_grad, reference.neg_grad, rtol, f"neg_grad at step {step}")
        assert crit.pos_grad.dtype == torch.float64 and crit.neg_grad.dtype == torch.float64
    assert int(crit.num_updates) == len(batches)


def compare_sequence(kwargs, dtype, rtol, num_steps=24, seed=0):
    crit = EQLv2Loss(NUM_CLASSES, **kwargs)
    reference = ReferenceEQLv2(NUM_CLASSES, **kwargs)
    compare_steps(crit, reference, make_batches(num_steps, seed), dtype, rtol)
    return crit, reference


# --------------------------------------------------------------------------- reference agreement
ABLATIONS = [
    {},
    {"pos_up_weight": False},
    {"neg_down_weight": False},
    {"use_agnostic": False},
    {"pos_up_weight": False, "neg_down_weight": False},
    {"use_agnostic": False, "pos_up_weight": False, "neg_down_weight": False},
    {"gamma": 6.0, "mu": 0.5, "alpha": 2.0},
]


@pytest.mark.parametrize("kwargs", ABLATIONS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_matches_reference_float64(kwargs):
    compare_sequence(kwargs, torch.float64, rtol=1e-10)


@pytest.mark.parametrize("kwargs", ABLATIONS[:4], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_matches_reference_float32(kwargs):
    compare_sequence(kwargs, torch.float32, rtol=1e-5)


def test_reference_sequence_exercises_the_reweighing():
    """The agreement tests are only meaningful if q and r move well away from 1 and 0."""
    _, reference = compare_sequence({}, torch.float64, rtol=1e-10)
    q, r = reference.weights()
    assert np.any((r > 0.05) & (r < 0.95)), r
    assert np.any(q > 4.5) and np.any(q < 3.5), q
    assert np.any(reference.pos_grad == 0), "some category should never be seen positive"


def test_never_seen_category_gets_tiny_negative_weight():
    crit, _ = compare_sequence({}, torch.float64, rtol=1e-10, num_steps=3)
    unseen = crit.pos_grad == 0
    assert unseen.any()
    q, r = crit.current_weights()
    expected_r = 1.0 / (1.0 + math.exp(12.0 * 0.8))
    assert torch.allclose(r[unseen], torch.full_like(r[unseen], expected_r), rtol=1e-12, atol=0)
    assert torch.allclose(q[unseen], 1.0 + 4.0 * (1.0 - r[unseen]), rtol=1e-12, atol=0)


def test_gradient_ratio_and_weights_helpers():
    crit, reference = compare_sequence({}, torch.float64, rtol=1e-10, num_steps=5)
    ratio = reference.pos_grad / (reference.neg_grad + EPS)
    assert_close(crit.gradient_ratio(), ratio, 1e-12, "gradient_ratio")
    q, r = crit.current_weights()
    assert q.shape == r.shape == (NUM_CLASSES,) and q.dtype == r.dtype == torch.float64


# --------------------------------------------------------------------------- first step, state
def test_first_step_weights_are_exactly_one():
    crit = EQLv2Loss(NUM_CLASSES)
    q, r = crit.current_weights()
    assert torch.equal(q, torch.ones(NUM_CLASSES, dtype=torch.float64))
    assert torch.equal(r, torch.ones(NUM_CLASSES, dtype=torch.float64))
    assert int(crit.num_updates) == 0
    logits, labels = make_batches(1, seed=3)[0]
    _, grad = run_step(crit, logits, labels)
    z = torch.tensor(logits)
    targets = torch.nn.functional.one_hot(torch.tensor(labels), NUM_CLASSES + 1).double()
    unweighted = (torch.sigmoid(z) - targets) / len(labels)
    assert_close(grad, unweighted.numpy(), 1e-14, "first-step gradient = unweighted BCE gradient")
    q, r = crit.current_weights()
    assert int(crit.num_updates) == 1
    assert not torch.equal(r, torch.ones_like(r))


def test_state_dict_save_and_restore_continues_identically():
    batches = make_batches(20, seed=7)
    original = EQLv2Loss(NUM_CLASSES)
    for logits, labels in batches[:10]:
        run_step(original, logits, labels)
    state = copy.deepcopy(original.state_dict())
    assert {"pos_grad", "neg_grad", "num_updates"} <= set(state)
    assert int(state["num_updates"]) == 10
    restored = EQLv2Loss(NUM_CLASSES)
    restored.load_state_dict(state)
    for step, (logits, labels) in enumerate(batches[10:], start=10):
        loss_a, grad_a = run_step(original, logits, labels)
        loss_b, grad_b = run_step(restored, logits, labels)
        assert loss_a == loss_b, f"loss differs at step {step}"
        assert np.array_equal(grad_a, grad_b), f"gradient differs at step {step}"
    assert torch.equal(original.pos_grad, restored.pos_grad)
    assert torch.equal(original.neg_grad, restored.neg_grad)
    assert torch.equal(original.num_updates, restored.num_updates)


def test_eval_mode_does_not_update_statistics():
    batches = make_batches(6, seed=11)
    crit = EQLv2Loss(NUM_CLASSES)
    reference = ReferenceEQLv2(NUM_CLASSES)
    for logits, labels in batches[:4]:
        run_step(crit, logits, labels)
        reference.step(logits, labels)
    before = copy.deepcopy(crit.state_dict())
    crit.eval()
    for logits, labels in batches[4:]:
        loss, grad = run_step(crit, logits, labels)
        loss_ref, grad_ref = reference.step(logits, labels, train=False)
        assert_close(loss, loss_ref, 1e-10, "eval loss")
        assert_close(grad, grad_ref, 1e-10, "eval gradient")
    for name, value in crit.state_dict().items():
        assert torch.equal(value, before[name]), name
    with torch.no_grad():
        crit(torch.tensor(batches[4][0]), torch.tensor(batches[4][1]))
    assert torch.equal(crit.num_updates, before["num_updates"])


def test_scores_follow_eq_10():
    rng = np.random.default_rng(5)
    z = rng.normal(0, 3, size=(9, NUM_CLASSES + 1))
    sigmoid = 1.0 / (1.0 + np.exp(-z))
    expected = sigmoid[:, :NUM_CLASSES] * (1.0 - sigmoid[:, NUM_CLASSES:])
    scores = EQLv2Loss(NUM_CLASSES).scores(torch.tensor(z))
    assert scores.shape == (9, NUM_CLASSES)
    assert_close(scores, expected, 1e-12, "scores")
    plain = EQLv2Loss(NUM_CLASSES, use_agnostic=False).scores(torch.tensor(z))
    assert_close(plain, sigmoid[:, :NUM_CLASSES], 1e-12, "scores without agnostic task")


def test_agnostic_column_gets_no_gradient_when_switched_off():
    logits, labels = make_batches(1, seed=2)[0]
    _, grad = run_step(EQLv2Loss(NUM_CLASSES, use_agnostic=False), logits, labels)
    assert np.all(grad[:, NUM_CLASSES] == 0.0)
    _, grad = run_step(EQLv2Loss(NUM_CLASSES), logits, labels)
    assert np.all(grad[:, NUM_CLASSES] != 0.0)


def test_empty_batch_gives_zero_loss_and_counts_a_step():
    crit = EQLv2Loss(NUM_CLASSES)
    z = torch.zeros(0, NUM_CLASSES + 1, requires_grad=True)
    loss = crit(z, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and z.grad.shape == (0, NUM_CLASSES + 1)
    assert int(crit.num_updates) == 1 and float(crit.pos_grad.sum()) == 0.0


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_keep_float64_statistics(dtype):
    crit = EQLv2Loss(NUM_CLASSES)
    reference = ReferenceEQLv2(NUM_CLASSES)
    for logits, labels in make_batches(6, seed=13):
        z = torch.tensor(logits, dtype=dtype, requires_grad=True)
        loss = crit(z, torch.tensor(labels))
        loss.backward()
        assert z.grad.dtype == dtype
        assert loss.dtype == torch.float32
        loss_ref, _ = reference.step(z.detach().double().numpy(), labels)
        assert_close(float(loss.detach()), loss_ref, 1e-5, "loss")
    assert crit.pos_grad.dtype == crit.neg_grad.dtype == torch.float64
    assert_close(crit.pos_grad, reference.pos_grad, 1e-5, "pos_grad")
    assert_close(crit.neg_grad, reference.neg_grad, 1e-5, "neg_grad")


def test_autocast_does_not_lower_the_loss_precision():
    logits, labels = make_batches(1, seed=17)[0]
    z = torch.tensor(logits, dtype=torch.float32)
    expected = EQLv2Loss(NUM_CLASSES)(z, torch.tensor(labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = EQLv2Loss(NUM_CLASSES)(z, torch.tensor(labels))
    assert actual.dtype == torch.float32 and torch.equal(actual, expected)


@pytest.mark.parametrize(("dtype", "magnitude", "rtol"),
                         [(torch.float32, 90.0, 1e-6), (torch.float64, 800.0, 1e-12)])
def test_extreme_logits_stay_finite_and_exact(dtype, magnitude, rtol):
    labels = np.array([0, 1, NUM_CLASSES, NUM_CLASSES])
    logits = np.zeros((4, NUM_CLASSES + 1))
    logits[0] = magnitude  # confident positive, confident wrong negatives
    logits[1] = -magnitude  # confident wrong positive, confident negatives
    logits[2, :NUM_CLASSES] = [(-1) ** j * 25.0 for j in range(NUM_CLASSES)]
    logits[3] = np.linspace(-40.0, 40.0, NUM_CLASSES + 1)
    loss, grad = run_step(EQLv2Loss(NUM_CLASSES), logits, labels, dtype)
    loss_ref, grad_ref = ReferenceEQLv2(NUM_CLASSES).step(logits, labels)
    assert math.isfinite(loss) and np.all(np.isfinite(grad))
    assert_close(loss, loss_ref, rtol, "loss")
    assert_close(grad, grad_ref, rtol, "gradient")


def test_module_dtype_casts_keep_float64_statistics():
    crit = EQLv2Loss(NUM_CLASSES)
    crit.pos_grad.fill_(1.0 / 3.0)
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
        cast(crit)
        assert crit.pos_grad.dtype == crit.neg_grad.dtype == torch.float64
        assert float(crit.pos_grad[0]) == 1.0 / 3.0


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_classes": 0}, r"num_classes.*0"),
        ({"num_classes": -3}, r"num_classes.*-3"),
        ({"num_classes": 2.5}, r"num_classes.*2\.5"),
        ({"gamma": 0.0}, r"gamma.*0\.0"),
        ({"gamma": -1.0}, r"gamma.*-1\.0"),
        ({"gamma": float("nan")}, r"gamma.*nan"),
        ({"alpha": -0.5}, r"alpha.*-0\.5"),
        ({"alpha": float("inf")}, r"alpha.*inf"),
        ({"mu": float("nan")}, r"mu.*nan"),
        ({"mu": float("inf")}, r"mu.*inf"),
        ({"mu": float("-inf")}, r"mu.*-inf"),
    ],
)
def test_bad_hyper_parameters_raise(kwargs, pattern):
    arguments = {"num_classes": NUM_CLASSES, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        EQLv2Loss(**arguments)


def test_valid_edge_hyper_parameters_are_accepted():
    EQLv2Loss(1, gamma=1e-3, mu=-5.0, alpha=0.0)


@pytest.mark.parametrize(
    ("logits_shape", "labels", "pattern"),
    [
        ((NUM_CLASSES + 1,), [0], r"logits.*\(13,\)"),
        ((2, 3, NUM_CLASSES + 1), [0, 1], r"logits.*\(2, 3, 13\)"),
        ((2, NUM_CLASSES), [0, 1], r"logits.*\(2, 12\)"),
        ((3, NUM_CLASSES + 1), [0, 1], r"labels.*\(2,\)"),
        ((2, NUM_CLASSES + 1), [[0, 1]], r"labels.*\(1, 2\)"),
        ((2, NUM_CLASSES + 1), [0, -1], r"labels.*-1"),
        ((2, NUM_CLASSES + 1), [0, NUM_CLASSES + 1], r"labels.*13"),
        ((2, NUM_CLASSES + 1), [0.0, 1.0], r"labels.*float"),
    ],
)
def test_bad_inputs_raise(logits_shape, labels, pattern):
    crit = EQLv2Loss(NUM_CLASSES)
    with pytest.raises(ValueError, match=pattern):
        crit(torch.zeros(logits_shape), torch.tensor(labels))
    assert int(crit.num_updates) == 0


def test_bad_logits_for_scores_raise():
    with pytest.raises(ValueError, match=r"logits.*\(4, 5\)"):
        EQLv2Loss(NUM_CLASSES).scores(torch.zeros(4, 5))


# --------------------------------------------------------------------------- distributed
DIST_STEPS = 4


def _distributed_batches():
    """Per step, one batch per rank."""
    batches = make_batches(2 * DIST_STEPS, seed=21)
    return [(batches[2 * s], batches[2 * s + 1]) for s in range(DIST_STEPS)]


def _distributed_worker(rank, world_size, init_file, result_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        crit = EQLv2Loss(NUM_CLASSES)
        for step_batches in _distributed_batches():
            logits, labels = step_batches[rank]
            run_step(crit, logits, labels)
        torch.save(crit.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)  # spawning two torch processes takes minutes on a loaded machine
def test_distributed_statistics_are_identical_and_match_union(tmp_path):
    world_size = 2
    mp.spawn(_distributed_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)),
             nprocs=world_size, join=True)
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]

    single = EQLv2Loss(NUM_CLASSES)
    for step_batches in _distributed_batches():
        logits = np.concatenate([b[0] for b in step_batches])
        labels = np.concatenate([b[1] for b in step_batches])
        run_step(single, logits, labels)

    assert torch.equal(states[0]["pos_grad"], states[1]["pos_grad"])
    assert torch.equal(states[0]["neg_grad"], states[1]["neg_grad"])
    assert int(states[0]["num_updates"]) == int(states[1]["num_updates"]) == DIST_STEPS
    assert_close(states[0]["pos_grad"], single.pos_grad, 1e-12, "pos_grad vs union")
    assert_close(states[0]["neg_grad"], single.neg_grad, 1e-12, "neg_grad vs union")
