"""Accumulated-gradient statistics of EQL v2 (the quantities of the paper's Figures 1-2).

Everything here is numpy on the host: a :class:`GradientStatistics` is a snapshot taken from a
loss module, detached from training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["GradientStatistics", "summarize", "FREQUENCY_GROUP_NAMES"]

#: LVIS frequency groups: rare (1-10 training images), common (11-100), frequent (>100).
FREQUENCY_GROUP_NAMES = ("r", "c", "f")


@dataclass(frozen=True)
class GradientStatistics:
    """Per-category statistics, each an array of shape ``(C,)``.

    Attributes:
        pos_grad: accumulated positive gradient magnitude, eq. 9's numerator.
        neg_grad: accumulated negative gradient magnitude, eq. 9's denominator.
        ratio: ``g = pos_grad / neg_grad`` (with the loss's epsilon).
        q: current positive weight, eq. 5.
        r: current negative weight, eq. 5.
    """

    pos_grad: np.ndarray
    neg_grad: np.ndarray
    ratio: np.ndarray
    q: np.ndarray
    r: np.ndarray

    @classmethod
    def from_loss(cls, loss) -> GradientStatistics:
        """Snapshot of an :class:`eqlv2.losses.EQLv2Loss` (any module with the same accessors)."""
        q, r = loss.current_weights()
        return cls(
            pos_grad=loss.pos_grad.detach().double().cpu().numpy().copy(),
            neg_grad=loss.neg_grad.detach().double().cpu().numpy().copy(),
            ratio=loss.gradient_ratio().detach().double().cpu().numpy().copy(),
            q=q.detach().double().cpu().numpy().copy(),
            r=r.detach().double().cpu().numpy().copy(),
        )

    def as_columns(self) -> dict[str, np.ndarray]:
        """Name → ``(C,)`` array, in a fixed order, for tables."""
        return {
            "pos_grad": self.pos_grad,
            "neg_grad": self.neg_grad,
            "ratio": self.ratio,
            "q": self.q,
            "r": self.r,
        }


def summarize(
    stats: GradientStatistics, groups: Sequence[str] | None = None, prefix: str = "eqlv2/"
) -> dict[str, float]:
    """Scalar summaries: mean ratio, q and r over all categories and per frequency group.

    Args:
        stats: the snapshot.
        groups: ``(C,)`` group label per category (e.g. 'r'/'c'/'f'); None for no grouping.
        prefix: prepended to every key.

    Returns:
        e.g. ``{"eqlv2/ratio_mean": .., "eqlv2/ratio_mean_r": .., "eqlv2/q_mean_r": .., ...}``;
        a group without categories is left out.
    """
    out: dict[str, float] = {}
    columns = {"ratio": stats.ratio, "q": stats.q, "r": stats.r}
    for name, values in columns.items():
        out[f"{prefix}{name}_mean"] = float(np.mean(values))
    if groups is None:
        return out
    labels = np.asarray(groups)
    if labels.shape != stats.ratio.shape:
        raise ValueError(
            f"groups has {labels.shape[0]} entries, the statistics {stats.ratio.shape[0]} categories"
        )
    for group in sorted(set(labels.tolist())):
        mask = labels == group
        for name, values in columns.items():
            out[f"{prefix}{name}_mean_{group}"] = float(np.mean(values[mask]))
    return out
