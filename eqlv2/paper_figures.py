"""The paper's figures drawn from data, for the reproduction report (matplotlib, headless).

* Figure 1/2 analogue, :func:`plot_gradient_ratios`: the accumulated positive-to-negative
  gradient ratio of each category (``pos_grad / neg_grad`` of :mod:`eqlv2.losses.statistics`), one curve
  per loss, one panel per training iteration, categories sorted by training instance count;
* Figure 3 analogue, :func:`plot_weight_norms`: the L2 norm of each category's classifier
  weight, one curve per model, sorted the same way;
* Figure 4, :func:`plot_mapping_functions`: f(g) = 1 / (1 + exp(-gamma (g - mu))) (eq. 6) for
  several (gamma, mu).

Every ``plot_*`` function writes one PNG (creating its folder) and returns the
:class:`matplotlib.figure.Figure`, built without pyplot (no global state), so callers and tests
can read the plotted data back. Categories are ordered from the most to the least frequent
(head on the left, as in the paper), ties in index order; frequency-group boundaries ('r', 'c',
'f') are drawn as vertical lines when the groups are given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "category_order",
    "mapping_function",
    "plot_gradient_ratios",
    "plot_mapping_functions",
    "plot_weight_norms",
]

#: Figure 4's (gamma, mu) pairs when none are given: the paper's default and Table 7's range.
DEFAULT_MAPPING_PARAMETERS = ((12.0, 0.8), (8.0, 0.7), (10.0, 0.9), (6.0, 0.5))

_PANEL_SIZE = (6.0, 3.4)
_DPI = 110


def mapping_function(ratio: np.ndarray, gamma: float, mu: float) -> np.ndarray:
    """f(g) = 1 / (1 + exp(-gamma (g - mu))) (eq. 6), elementwise, float64."""
    exponent = -gamma * (np.asarray(ratio, dtype=np.float64) - mu)
    return np.exp(-np.logaddexp(0.0, exponent))  # 1 / (1 + e^x) without overflow


def category_order(counts: Sequence[float]) -> np.ndarray:
    """(C,) category indices from the most to the least frequent, ties in index order."""
    return np.argsort(-np.asarray(counts, dtype=np.float64), kind="stable")


def _new_figure(num_panels: int = 1) -> tuple[Figure, list[Axes]]:
    width, height = _PANEL_SIZE
    figure = Figure(figsize=(width * num_panels, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, num_panels, sharey=True, squeeze=False)[0]
    return figure, list(axes)


def _save(figure: Figure, path: str | Path) -> Figure:
    """Writes ``figure`` as a PNG at ``path`` (creating its folder) and returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return figure


def _check_curves(curves: Mapping[str, Sequence[float]], num_categories: int, what: str) -> dict[str, np.ndarray]:
    """The curves as float64 arrays, each checked to have one value per category."""
    if not curves:
        raise ValueError(f"{what}: no curve to plot")
    arrays = {}
    for label, values in curves.items():
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (num_categories,):
            raise ValueError(
                f"{what}: curve {label!r} has shape {array.shape}, expected ({num_categories},) "
                "like the category counts"
            )
        arrays[label] = array
    return arrays


def _draw_group_boundaries(ax: Axes, groups: Sequence[str] | None, order: np.ndarray) -> None:
    """Vertical lines where the frequency group changes along ``order``, the group names on top."""
    if groups is None:
        return
    labels = np.asarray(groups)
    if labels.shape != order.shape:
        raise ValueError(f"groups has {labels.size} entries, the counts {order.size}")
    sorted_labels = labels[order]
    starts = [0] + [i for i in range(1, len(sorted_labels)) if sorted_labels[i] != sorted_labels[i - 1]]
    for start, end in zip(starts, starts[1:] + [len(sorted_labels)], strict=True):
        if start > 0:
            ax.axvline(start - 0.5, color="#999999", lw=0.8, ls="--")
        ax.text((start + end - 1) / 2, 1.0, str(sorted_labels[start]), transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8, color="#555555")


def _draw_sorted_curves(ax: Axes, curves: dict[str, np.ndarray], order: np.ndarray, groups) -> None:
    x = np.arange(order.size)
    for label, values in curves.items():
        ax.plot(x, values[order], lw=1.2, label=label)
    _draw_group_boundaries(ax, groups, order)
    ax.set_xlim(-0.5, order.size - 0.5)
    ax.set_xlabel("category, sorted by training instance count (head left)")
    ax.legend(loc="best", fontsize=8)


def plot_gradient_ratios(
    ratios: Mapping[str, Mapping[str, Sequence[float]]],
    counts: Sequence[float],
    path: str | Path,
    *,
    groups: Sequence[str] | None = None,
) -> Figure:
    """Figure 1/2 analogue: accumulated positive/negative gradient ratio per category.

    Args:
        ratios: panel title (e.g. "iteration 1000") -> {curve label (e.g. "softmax CE") -> (C,)
            ratios}; one panel per entry, left to right.
        counts: (C,) training instance count of each category, to sort the categories.
        path: PNG file to write.
        groups: (C,) frequency group of each category ('r', 'c', 'f'), or None.

    Returns:
        The figure; panel k's lines hold the curves of the k-th entry, sorted by ``counts``.
    """
    order = category_order(counts)
    if not ratios:
        raise ValueError("plot_gradient_ratios: no panel to plot")
    figure, axes = _new_figure(len(ratios))
    for ax, (title, curves) in zip(axes, ratios.items(), strict=True):
        _draw_sorted_curves(ax, _check_curves(curves, order.size, f"panel {title!r}"), order, groups)
        ax.axhline(1.0, color="#444444", lw=0.6)
        ax.set_title(str(title), pad=14)
    axes[0].set_ylabel("accumulated pos / neg gradient")
    return _save(figure, path)


def plot_weight_norms(
    norms: Mapping[str, Sequence[float]],
    counts: Sequence[float],
    path: str | Path,
    *,
    groups: Sequence[str] | None = None,
    title: str = "L2 norm of the classifier weight (fc-cls)",
) -> Figure:
    """Figure 3 analogue: ``||w_j||`` of each category's classifier weight, one curve per model.

    Args:
        norms: curve label (e.g. "EQL v2") -> (C,) weight norms.
        counts: (C,) training instance count of each category, to sort the categories.
        path: PNG file to write.
        groups: (C,) frequency group of each category, or None.
    """
    order = category_order(counts)
    figure, (ax,) = _new_figure()
    _draw_sorted_curves(ax, _check_curves(norms, order.size, "plot_weight_norms"), order, groups)
    ax.set_ylabel("||w_j||")
    ax.set_title(title, pad=14)
    return _save(figure, path)


def plot_mapping_functions(
    path: str | Path,
    parameters: Sequence[tuple[float, float]] = DEFAULT_MAPPING_PARAMETERS,
    *,
    max_ratio: float = 1.5,
    num_points: int = 301,
) -> Figure:
    """Figure 4: f(g) of eq. 6 on g in [0, ``max_ratio``], one curve per (gamma, mu).

    Args:
        path: PNG file to write.
        parameters: the (gamma, mu) pairs, gamma > 0.
        max_ratio: right end of the g axis.
        num_points: samples per curve.
    """
    if not parameters:
        raise ValueError("plot_mapping_functions: no (gamma, mu) pair given")
    for gamma, mu in parameters:
        if not (np.isfinite(gamma) and gamma > 0 and np.isfinite(mu)):
            raise ValueError(f"plot_mapping_functions: need gamma > 0 and a finite mu, got ({gamma}, {mu})")
    ratio = np.linspace(0.0, max_ratio, num_points)
    figure, (ax,) = _new_figure()
    for gamma, mu in parameters:
        ax.plot(ratio, mapping_function(ratio, gamma, mu), lw=1.4, label=f"gamma={gamma:g}, mu={mu:g}")
    ax.set_xlabel("accumulated gradient ratio g")
    ax.set_ylabel("f(g)  (negative weight r)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Mapping function f(g) = 1 / (1 + exp(-gamma (g - mu)))")
    ax.legend(loc="lower right", fontsize=8)
    return _save(figure, path)
