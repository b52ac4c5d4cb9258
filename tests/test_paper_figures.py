"""The report's figures: PNG files are written and the plotted lines are the data given."""

from __future__ import annotations

import numpy as np
import pytest

from eqlv2.paper_figures import (
    category_order,
    plot_gradient_ratios,
    plot_mapping_functions,
    plot_weight_norms,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COUNTS = [5, 400, 40, 400, 2, 90]  # sorted: 1, 3 (tie, index order), 5, 2, 0, 4
ORDER = [1, 3, 5, 2, 0, 4]
GROUPS = ["r", "f", "c", "f", "r", "c"]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000


def lines_of(ax):
    """Label -> (x, y) of the data lines of ``ax`` (reference lines have no label)."""
    return {
        line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata()))
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


def test_category_order_is_descending_and_stable():
    assert category_order(COUNTS).tolist() == ORDER


def test_gradient_ratio_panels_hold_the_sorted_input(tmp_path):
    rng = np.random.default_rng(0)
    ratios = {
        f"iteration {it}": {"softmax CE": rng.random(6), "EQL v2": rng.random(6) + 0.5}
        for it in (100, 200, 300)
    }
    path = tmp_path / "figs" / "ratio.png"
    figure = plot_gradient_ratios(ratios, COUNTS, path, groups=GROUPS)
    assert_png(path)
    axes = figure.get_axes()
    assert [ax.get_title() for ax in axes] == list(ratios)
    for ax, curves in zip(axes, ratios.values(), strict=True):
        lines = lines_of(ax)
        assert list(lines) == list(curves)
        for label, values in curves.items():
            x, y = lines[label]
            np.testing.assert_array_equal(x, np.arange(6))
            np.testing.assert_array_equal(y, np.asarray(values)[ORDER])
    boundaries = [line.get_xdata()[0] for line in axes[0].get_lines() if line.get_linestyle() == "--"]
    assert boundaries == [1.5, 3.5]  # f | c | r along the sorted order


def test_weight_norms_hold_the_sorted_input(tmp_path):
    norms = {"softmax CE": [1, 2, 3, 4, 5, 6], "RFS": [6, 5, 4, 3, 2, 1], "EQL v2": [1, 1, 2, 2, 3, 3]}
    path = tmp_path / "norms.png"
    figure = plot_weight_norms(norms, COUNTS, path)
    assert_png(path)
    lines = lines_of(figure.get_axes()[0])
    assert list(lines) == list(norms)
    for label, values in norms.items():
        np.testing.assert_array_equal(lines[label][1], np.asarray(values, dtype=float)[ORDER])


def test_mapping_functions_are_eq_6(tmp_path):
    pairs = [(12.0, 0.8), (6.0, 0.5), (20.0, 1.0)]
    path = tmp_path / "f.png"
    figure = plot_mapping_functions(path, pairs, max_ratio=2.0, num_points=101)
    assert_png(path)
    lines = lines_of(figure.get_axes()[0])
    assert list(lines) == ["gamma=12, mu=0.8", "gamma=6, mu=0.5", "gamma=20, mu=1"]
    for (gamma, mu), (x, y) in zip(pairs, lines.values(), strict=True):
        np.testing.assert_allclose(x, np.linspace(0.0, 2.0, 101), rtol=0, atol=0)
        np.testing.assert_allclose(y, [1.0 / (1.0 + np.exp(-gamma * (g - mu))) for g in x], rtol=1e-12)
        assert y[np.searchsorted(x, mu)] == pytest.approx(0.5, abs=gamma * 0.01)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda p: plot_gradient_ratios({"it 1": {"EQL v2": [1.0, 2.0]}}, COUNTS, p), r"'EQL v2'.*\(2,\).*\(6,\)"),
        (lambda p: plot_gradient_ratios({}, COUNTS, p), r"no panel"),
        (lambda p: plot_weight_norms({}, COUNTS, p), r"no curve"),
        (lambda p: plot_weight_norms({"a": np.ones(6)}, COUNTS, p, groups=["r"]), r"groups has 1.*6"),
        (lambda p: plot_mapping_functions(p, [(0.0, 0.8)]), r"gamma > 0.*\(0\.0, 0\.8\)"),
        (lambda p: plot_mapping_functions(p, [(12.0, float("nan"))]), r"finite mu"),
    ],
)
def test_bad_data_is_named(tmp_path, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
