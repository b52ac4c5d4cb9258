"""Time and memory overhead of EQL v2, and of the baselines' gradient statistics.

Forward + backward of ``EQLv2Loss`` (training mode, statistics updated every step) against
``F.binary_cross_entropy_with_logits(logits, one_hot_targets, reduction="sum") / N`` on the same
(N, C+1) float32 CPU logits (default N=1024 RoIs, C=1203 LVIS categories), interleaved
A, B, A, B, ... after a warm-up; the medians are compared. In the same interleaved rounds:

- ``SigmoidBCELoss`` (agnostic column trained, so the same loss as the BCE line) in training
  mode, which accumulates the gradient statistics, against the BCE line and against itself in
  eval mode (no statistics): the cost of collecting them;
- ``SoftmaxCELoss`` in training mode (statistics) against ``F.cross_entropy``.

Memory: the peak of bytes held by tensors that torch allocates during one forward + backward
(beyond the pre-existing logits and targets; the returned gradient included), from the
allocation / free records that ``torch.profiler`` keeps with ``profile_memory=True``, replayed
in time order. The bytes of tensors saved for backward (``saved_tensors_hooks``) are printed
too. Not counted on either side: BCE's dense (N, C+1) target tensor, which its caller has to
build and EQL v2 does not need.

Usage: ``python benchmarks/loss_overhead.py [--threads 1] [--runs 200] [--naive]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from eqlv2.losses import EQLv2Loss, SigmoidBCELoss, SoftmaxCELoss

TARGET_RATIO = 1.2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--runs", type=int, default=200, help="timed runs of each loss")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs of each loss first")
    parser.add_argument("--rois", type=int, default=1024, help="N, proposals per batch")
    parser.add_argument("--classes", type=int, default=1203, help="C, foreground categories")
    parser.add_argument(
        "--background", type=float, default=0.75, help="fraction of background proposals"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--naive",
        action="store_true",
        help="also time a naive dense EQL v2 transcription, for context",
    )
    return parser.parse_args()


def make_batch(num_rois: int, num_classes: int, background: float) -> tuple[torch.Tensor, ...]:
    """Logits (N, C+1) needing grad, labels (N,) and one-hot float targets (N, C+1)."""
    logits = torch.randn(num_rois, num_classes + 1).requires_grad_(True)
    is_background = torch.rand(num_rois) < background
    labels = torch.where(
        is_background,
        torch.full((num_rois,), num_classes),
        torch.randint(0, num_classes, (num_rois,)),
    )
    targets = F.one_hot(labels, num_classes + 1).to(logits.dtype)
    return logits, labels, targets


class NaiveEQLv2:
    """EQL v2 written the obvious way (dense targets and weights), timed for context only."""

    def __init__(self, num_classes: int, gamma: float = 12.0, mu: float = 0.8, alpha: float = 4.0):
        self.num_classes, self.gamma, self.mu, self.alpha = num_classes, gamma, mu, alpha
        self.pos_grad = torch.zeros(num_classes, dtype=torch.float64)
        self.neg_grad = torch.zeros(num_classes, dtype=torch.float64)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_rows = logits.shape[0]
        f = torch.sigmoid(self.gamma * (self.pos_grad / (self.neg_grad + 1e-10) - self.mu))
        ones = f.new_ones(1)
        negative = torch.cat([f, ones]).float()
        positive = torch.cat([1 + self.alpha * (1 - f), ones]).float()
        weights = positive * targets + negative * (1 - targets)
        losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        with torch.no_grad():
            magnitudes = (torch.sigmoid(logits) - targets).abs() * weights
            self.pos_grad += (magnitudes * targets).sum(0)[:-1].double()
            self.neg_grad += (magnitudes * (1 - targets)).sum(0)[:-1].double()
        return (losses * weights).sum() / num_rows


def median_times(steps: dict[str, Callable[[], None]], runs: int, warmup: int) -> dict[str, float]:
    """Run the steps interleaved, ``warmup`` untimed rounds then ``runs`` timed ones; medians in s."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(runs):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send the C++ side's stderr (kineto's start/stop chatter) to /dev/null for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_allocated_bytes(step: Callable[[], None]) -> int:
    """Peak of live bytes torch allocates on CPU during ``step``.

    Replays, in time order, every allocation (+bytes) and free (-bytes) record that
    ``torch.profiler`` keeps with ``profile_memory=True`` (the raw kineto records: the per-op
    summaries would hide temporaries allocated and freed inside one op).
    """
    with (
        native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        step()
    records = [r for r in prof.profiler.kineto_results.events() if r.name() == "[memory]"]
    records.sort(key=lambda r: r.start_ns())
    live = peak = 0
    for record in records:
        live += record.nbytes()
        peak = max(peak, live)
    return peak


def saved_for_backward_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for backward during ``forward``."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(seen.values())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    logits, labels, targets = make_batch(args.rois, args.classes, args.background)
    criterion = EQLv2Loss(num_classes=args.classes).train()

    def eqlv2_forward() -> torch.Tensor:
        return criterion(logits, labels)

    def bce_forward() -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / args.rois

    naive = NaiveEQLv2(args.classes)
    sigmoid_stats = SigmoidBCELoss(args.classes, use_agnostic=True).train()
    sigmoid_plain = SigmoidBCELoss(args.classes, use_agnostic=True).eval()
    softmax_stats = SoftmaxCELoss(args.classes).train()

    def gradient_step(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: torch.autograd.grad(forward(), logits)

    steps = {
        "eqlv2": gradient_step(eqlv2_forward),
        "bce": gradient_step(bce_forward),
        "sigmoid_stats": gradient_step(lambda: sigmoid_stats(logits, labels)),
        "sigmoid_plain": gradient_step(lambda: sigmoid_plain(logits, labels)),
        "softmax_stats": gradient_step(lambda: softmax_stats(logits, labels)),
        "cross_entropy": gradient_step(lambda: F.cross_entropy(logits, labels)),
    }
    if args.naive:
        steps["naive"] = gradient_step(lambda: naive(logits, targets))
    eqlv2_step, bce_step = steps["eqlv2"], steps["bce"]
    medians = median_times(steps, args.runs, args.warmup)
    time_ratio = medians["eqlv2"] / medians["bce"]
    peaks = {"eqlv2": peak_allocated_bytes(eqlv2_step), "bce": peak_allocated_bytes(bce_step)}
    saved = {
        "eqlv2": saved_for_backward_bytes(eqlv2_forward),
        "bce": saved_for_backward_bytes(bce_forward),
    }

    print(
        f"logits {tuple(logits.shape)} float32, threads={args.threads}, "
        f"{args.runs} interleaved runs each after {args.warmup} warm-up, forward+backward"
    )
    print(f"EQL v2 (train mode, stats updated): median {medians['eqlv2'] * 1e3:.3f} ms")
    print(f"BCE with logits (one-hot targets):  median {medians['bce'] * 1e3:.3f} ms")
    verdict = "OK" if time_ratio <= TARGET_RATIO else "ABOVE TARGET"
    print(f"time ratio EQL v2 / BCE: {time_ratio:.3f}x (target <= {TARGET_RATIO}x: {verdict})")
    if args.naive:
        print(
            f"(context) naive dense EQL v2: median {medians['naive'] * 1e3:.3f} ms, "
            f"{medians['naive'] / medians['bce']:.3f}x BCE"
        )
    ratios = [
        ("sigmoid BCE + statistics / BCE with logits", "sigmoid_stats", "bce"),
        ("sigmoid BCE + statistics / same loss without (eval)", "sigmoid_stats", "sigmoid_plain"),
        ("softmax CE + statistics / F.cross_entropy", "softmax_stats", "cross_entropy"),
    ]
    for text, numerator, denominator in ratios:
        print(
            f"{text}: {medians[numerator] / medians[denominator]:.3f}x "
            f"({medians[numerator] * 1e3:.3f} ms vs {medians[denominator] * 1e3:.3f} ms)"
        )
    print(
        f"peak allocated during forward+backward (profiler memory events): "
        f"EQL v2 {peaks['eqlv2'] / 2**20:.2f} MiB, BCE {peaks['bce'] / 2**20:.2f} MiB, "
        f"ratio {peaks['eqlv2'] / peaks['bce']:.3f}x"
    )
    print(
        f"saved for backward: EQL v2 {saved['eqlv2'] / 2**20:.2f} MiB, "
        f"BCE {saved['bce'] / 2**20:.2f} MiB (BCE's are its inputs, which exist anyway)"
    )


if __name__ == "__main__":
    main()
