"""Figures of a search: gradient ratios (paper Fig. 1-2), classifier weight norms (Fig. 3), Optuna.

Each returns a matplotlib ``Figure`` (None when there is nothing to draw). The trial figures are
built without pyplot (no global state in a training process).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from optuna.visualization.matplotlib import (  # noqa: E402
    plot_optimization_history,
    plot_param_importances,
    plot_pareto_front,
)

logger = logging.getLogger(__name__)

_GROUP_COLOURS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}
_GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}
#: Margins of the per-category figures (fractions of 8 x 3.6 inches).
CATEGORY_AXES_MARGINS = {"left": 0.1, "right": 0.97, "bottom": 0.14, "top": 0.9}


def frequency_order(counts: Sequence[float]) -> np.ndarray:
    """Category indices from the most to the least frequent (stable for ties)."""
    return np.argsort(-np.asarray(counts, dtype=float), kind="stable")


def _shade_groups(ax, groups: Sequence[str] | None, order: np.ndarray) -> None:
    if groups is None:
        return
    labels, start = [str(label) for label in np.asarray(groups)[order]], 0
    for label, run in itertools.groupby(labels):  # one shaded span per run of one group
        end = start + len(list(run))
        ax.axvspan(start - 0.5, end - 0.5, color=_GROUP_COLOURS.get(label, "#888888"), alpha=0.08, lw=0)
        start = end
    for group, name in _GROUP_NAMES.items():
        if group in labels:
            ax.plot([], [], color=_GROUP_COLOURS[group], alpha=0.3, lw=8, label=name)


def _category_axes(counts: Sequence[float], groups: Sequence[str] | None, title: str, ylabel: str):
    """A figure whose x axis is the categories sorted by training frequency (head on the left)."""
    order = frequency_order(counts)
    figure = Figure(figsize=(8, 3.6), dpi=100)
    # Fixed margins, room for the labels these figures have: tight_layout would draw the figure
    # once more before it is saved (a third of its cost, after every evaluation of every trial).
    figure.subplots_adjust(**CATEGORY_AXES_MARGINS)
    ax = figure.subplots()
    _shade_groups(ax, groups, order)
    ax.set_xlabel("category index, sorted by training frequency")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xlim(-0.5, len(order) - 0.5)
    return figure, ax, order


def gradient_ratio_figure(
    ratio: Sequence[float],
    counts: Sequence[float],
    *,
    groups: Sequence[str] | None = None,
    baseline_ratio: Sequence[float] | None = None,
    title: str = "Accumulated positive/negative gradient ratio",
) -> Figure:
    """Ratio of accumulated positive to negative gradients per category, as in Figures 1-2.

    ``ratio``, ``counts`` (training instances or images, which sort the categories), ``groups``
    (shaded frequency groups) and ``baseline_ratio`` (drawn for comparison) are ``(C,)``.
    """
    figure, ax, order = _category_axes(counts, groups, title, "pos / neg gradient")
    x = np.arange(len(order))
    if baseline_ratio is not None:
        ax.plot(x, np.asarray(baseline_ratio, dtype=float)[order], color="#7f7f7f", lw=1.2, label="baseline")
    ax.plot(x, np.asarray(ratio, dtype=float)[order], color="#2ca02c", lw=1.5, label="EQL v2")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=8)
    return figure


def weight_norms_figure(
    norms: Sequence[float], counts: Sequence[float], *, groups: Sequence[str] | None = None, title: str = "Classifier weight norms"
) -> Figure:
    """L2 norm of each category's ``(C,)`` classifier weight vector, as in Figure 3."""
    figure, ax, order = _category_axes(counts, groups, title, "||w_j||")
    ax.bar(np.arange(len(order)), np.asarray(norms, dtype=float)[order], width=1.0, color="#1f77b4")
    if groups is not None:
        ax.legend(loc="upper right", fontsize=8)
    return figure


def _optuna_figure(draw, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        drawn = draw(*args, **kwargs)
    figure = (np.ravel(drawn)[0] if isinstance(drawn, np.ndarray) else drawn).figure
    plt.close(figure)
    figure.set_size_inches(8, 4.5)
    figure.tight_layout()
    return figure


def _complete_trials(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def optuna_history_figure(study: optuna.Study, target_name: str = "objective") -> Figure | None:
    """Optuna's optimisation history (Pareto front for several objectives); None without a
    complete trial."""
    if not _complete_trials(study):
        logger.info("No complete trial: no optimisation history plot")
        return None
    if len(study.directions) > 1:
        return _optuna_figure(plot_pareto_front, study)
    return _optuna_figure(plot_optimization_history, study, target_name=target_name)


def optuna_importance_figure(study: optuna.Study, target_name: str = "objective", min_trials: int = 2) -> Figure | None:
    """Optuna's hyper-parameter importance (fANOVA); None with fewer than ``min_trials`` complete
    trials or when the study cannot support it (one searched parameter)."""
    if len(_complete_trials(study)) < min_trials:
        logger.info("Fewer than %d complete trials: no parameter-importance plot", min_trials)
        return None
    target = (lambda trial: trial.values[0]) if len(study.directions) > 1 else None
    try:
        return _optuna_figure(plot_param_importances, study, target=target, target_name=target_name)
    except (RuntimeError, ValueError) as error:
        logger.info("No parameter-importance plot: %s", error)
        plt.close("all")
        return None


def save_figure(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
