"""Figures of a search: gradient ratios (paper Fig. 1-2), classifier weight norms (Fig. 3), Optuna.

Every function writes one file and returns its path; matplotlib runs headless (Agg).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "frequency_order",
    "plot_gradient_ratio",
    "plot_weight_norms",
    "plot_optuna_history",
    "plot_optuna_importance",
]

_GROUP_COLOURS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}
_GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def frequency_order(counts: Sequence[float]) -> np.ndarray:
    """Category indices from the most to the least frequent (stable for ties)."""
    return np.argsort(-np.asarray(counts, dtype=float), kind="stable")


def _shade_groups(ax, groups: Sequence[str] | None, order: np.ndarray) -> None:
    """Shades the x-range of each frequency group (categories in ``order``)."""
    if groups is None:
        return
    labels = np.asarray(groups)[order]
    start = 0
    for index in range(1, len(labels) + 1):
        if index == len(labels) or labels[index] != labels[start]:
            group = str(labels[start])
            ax.axvspan(
                start - 0.5,
                index - 0.5,
                color=_GROUP_COLOURS.get(group, "#888888"),
                alpha=0.08,
                lw=0,
            )
            start = index
    for group, name in _GROUP_NAMES.items():
        if group in labels:
            ax.plot([], [], color=_GROUP_COLOURS[group], alpha=0.3, lw=8, label=name)


def plot_gradient_ratio(
    ratio: Sequence[float],
    counts: Sequence[float],
    path: str | Path,
    *,
    groups: Sequence[str] | None = None,
    baseline_ratio: Sequence[float] | None = None,
    title: str = "Accumulated positive/negative gradient ratio",
    label: str = "EQL v2",
    baseline_label: str = "baseline",
) -> Path:
    """Ratio of accumulated positive to negative gradients per category, categories sorted by
    training frequency (head on the left), as in the paper's Figures 1-2.

    Args:
        ratio: ``(C,)`` ratio of the trial.
        counts: ``(C,)`` training instance (or image) counts used to sort the categories.
        path: PNG file to write.
        groups: ``(C,)`` frequency group of each category, shaded in the background.
        baseline_ratio: ``(C,)`` ratio of a baseline model, drawn for comparison when given.
    """
    ratio = np.asarray(ratio, dtype=float)
    order = frequency_order(counts)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    _shade_groups(ax, groups, order)
    x = np.arange(len(order))
    if baseline_ratio is not None:
        ax.plot(x, np.asarray(baseline_ratio, dtype=float)[order], color="#7f7f7f", lw=1.2, label=baseline_label)
    ax.plot(x, ratio[order], color="#2ca02c", lw=1.5, label=label)
    ax.set_xlabel("category index, sorted by training frequency")
    ax.set_ylabel("pos / neg gradient")
    ax.set_title(title)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_weight_norms(
    norms: Sequence[float],
    counts: Sequence[float],
    path: str | Path,
    *,
    groups: Sequence[str] | None = None,
    title: str = "Classifier weight norms",
) -> Path:
    """L2 norm of each category's classifier weight vector, categories sorted by training
    frequency, as in the paper's Figure 3."""
    norms = np.asarray(norms, dtype=float)
    order = frequency_order(counts)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    _shade_groups(ax, groups, order)
    ax.bar(np.arange(len(order)), norms[order], width=1.0, color="#1f77b4")
    ax.set_xlabel("category index, sorted by training frequency")
    ax.set_ylabel("||w_j||")
    ax.set_title(title)
    ax.set_xlim(-0.5, len(order) - 0.5)
    if groups is not None:
        ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def _save_optuna_figure(ax_or_fig, path: Path) -> Path:
    fig = ax_or_fig.figure if hasattr(ax_or_fig, "figure") and not hasattr(ax_or_fig, "savefig") else ax_or_fig
    if isinstance(fig, np.ndarray):  # some Optuna plots return an array of axes
        fig = fig.flat[0].figure
    fig.set_size_inches(8, 4.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_optuna_history(study, path: str | Path, target_name: str = "objective") -> Path | None:
    """Optuna's optimisation history (value per trial and the best so far) as a PNG.

    Returns None, with a log line, when the study has no complete trial.
    """
    import optuna
    from optuna.visualization.matplotlib import plot_optimization_history

    path = Path(path)
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        logger.info("No complete trial: no optimisation history plot")
        return None
    if len(study.directions) > 1:
        from optuna.visualization.matplotlib import plot_pareto_front

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            figure = plot_pareto_front(study)
        return _save_optuna_figure(figure, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figure = plot_optimization_history(study, target_name=target_name)
    return _save_optuna_figure(figure, path)


def plot_optuna_importance(study, path: str | Path, target_name: str = "objective") -> Path | None:
    """Optuna's hyper-parameter importance (fANOVA) as a PNG.

    Returns None, with a log line, when the study cannot support it (fewer than two complete
    trials, or a single searched parameter).
    """
    import optuna
    from optuna.visualization.matplotlib import plot_param_importances

    path = Path(path)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        logger.info("Fewer than two complete trials: no parameter-importance plot")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if len(study.directions) > 1:
                figure = plot_param_importances(study, target=lambda t: t.values[0], target_name=target_name)
            else:
                figure = plot_param_importances(study, target_name=target_name)
    except (RuntimeError, ValueError) as error:
        logger.info("No parameter-importance plot: %s", error)
        plt.close("all")
        return None
    return _save_optuna_figure(figure, path)


def _save(fig, path: str | Path) -> Path:
    """Lays out ``fig``, writes it to ``path`` (creating its folder), closes it; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
