"""Accumulated-gradient statistics of the classification losses (the paper's Figures 1-2).

Every loss of :mod:`eqlv2.losses` accumulates them (EQL v2 uses them for its weights; the
baselines only record them, so that their gradient ratio can be compared with EQL v2's).
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
        pos_grad: accumulated positive gradient magnitude, eq. 9's numerator (see
            :class:`eqlv2.losses.ClassificationLoss` for its exact definition).
        neg_grad: accumulated negative gradient magnitude, eq. 9's denominator.
        ratio: ``g = pos_grad / neg_grad`` (with the loss's epsilon).
        q: current positive weight, eq. 5; None for a loss that does not reweigh (baselines).
        r: current negative weight, eq. 5; None for a loss that does not reweigh.
    """

    pos_grad: np.ndarray
    neg_grad: np.ndarray
    ratio: np.ndarray
    q: np.ndarray | None = None
    r: np.ndarray | None = None

    @classmethod
    def from_loss(cls, loss) -> GradientStatistics:
        """Snapshot of any :class:`eqlv2.losses.ClassificationLoss`.

        ``q`` and ``r`` are taken from ``loss.current_weights()`` when the loss has it (EQL v2).
        """
        weights = loss.current_weights() if hasattr(loss, "current_weights") else (None, None)
        q, r = (None if w is None else _to_numpy(w) for w in weights)
        return cls(
            pos_grad=_to_numpy(loss.pos_grad),
            neg_grad=_to_numpy(loss.neg_grad),
            ratio=_to_numpy(loss.gradient_ratio()),
            q=q,
            r=r,
        )

    def as_columns(self) -> dict[str, np.ndarray]:
        """Name → ``(C,)`` array, in a fixed order, for tables (q and r only when present)."""
        columns = {"pos_grad": self.pos_grad, "neg_grad": self.neg_grad, "ratio": self.ratio}
        for name, values in (("q", self.q), ("r", self.r)):
            if values is not None:
                columns[name] = values
        return columns


def _to_numpy(values) -> np.ndarray:
    """A float64 numpy copy of a tensor, detached and on the host."""
    return values.detach().double().cpu().numpy().copy()


def summarize(
    stats: GradientStatistics, groups: Sequence[str] | None = None, prefix: str = "eqlv2/"
) -> dict[str, float]:
    """Scalar summaries: mean ratio, q and r over all categories and per frequency group.

    q and r are left out for a loss without them (the baselines).

    Args:
        stats: the snapshot.
        groups: ``(C,)`` group label per category (e.g. 'r'/'c'/'f'); None for no grouping.
        prefix: prepended to every key.

    Returns:
        e.g. ``{"eqlv2/ratio_mean": .., "eqlv2/ratio_mean_r": .., "eqlv2/q_mean_r": .., ...}``;
        a group without categories is left out.
    """
    out: dict[str, float] = {}
    columns = {name: values for name, values in stats.as_columns().items() if name in ("ratio", "q", "r")}
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
