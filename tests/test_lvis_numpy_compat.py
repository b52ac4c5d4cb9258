"""The ``np.float`` workaround for ``lvis==0.5.3``: still needed, and working.

When ``test_workaround_is_still_needed`` fails, an lvis release (or numpy) no longer needs the
workaround: delete ``eqlv2/evaluation/lvis_numpy_compat.py`` and its uses.
"""

from __future__ import annotations

import json

import numpy
import pytest

from eqlv2.evaluation.lvis_numpy_compat import lvis_needs_numpy_compat, lvis_numpy_compat


@pytest.fixture()
def lvis_eval(tmp_path):
    """An ``LVISEval`` over one image with one box and one matching detection."""
    from lvis import LVIS, LVISEval, LVISResults

    gt = {
        "images": [
            {
                "id": 1,
                "height": 50,
                "width": 50,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            }
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [5, 5, 20, 20],
                "area": 400.0,
                "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]],
            }
        ],
        "categories": [{"id": 1, "name": "thing", "frequency": "f"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    lvis_gt = LVIS(str(path))
    results = [{"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "score": 0.9}]
    return LVISEval(lvis_gt, LVISResults(lvis_gt, results), "bbox")


def test_workaround_is_still_needed(lvis_eval):
    assert lvis_needs_numpy_compat(), "numpy has np.float again: the workaround is a no-op"
    try:
        lvis_eval.run()
    except AttributeError as error:
        assert "float" in str(error)
    else:
        pytest.fail(
            "lvis.LVISEval ran without the np.float workaround: delete "
            "eqlv2/evaluation/lvis_numpy_compat.py and its uses"
        )


def test_lvis_eval_runs_under_workaround(lvis_eval):
    import lvis.eval

    with lvis_numpy_compat():
        assert lvis.eval.np is not numpy
        lvis_eval.run()
    assert lvis_eval.results["AP"] == pytest.approx(1.0)
    # Scoped: lvis.eval gets numpy back and numpy itself never gained the alias.
    assert lvis.eval.np is numpy
    assert not hasattr(numpy, "float")


def test_workaround_restores_numpy_on_error():
    import lvis.eval

    with pytest.raises(RuntimeError), lvis_numpy_compat():
        assert lvis.eval.np.float is float
        assert lvis.eval.np.linspace is numpy.linspace
        raise RuntimeError("boom")
    assert lvis.eval.np is numpy
