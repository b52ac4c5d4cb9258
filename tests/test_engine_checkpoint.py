"""Untrusted weights: a pickled payload never runs unless the user opts in; .pth files load."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from eqlv2.engine import EQLv2Trainer, setup_cfg
from eqlv2.engine.checkpoint import OPT_IN_KEY, SafeDetectionCheckpointer, UntrustedWeightsError
from eqlv2.engine.trainer import load_model_weights

TINY = "configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml"


class _Payload:
    """Unpickling it creates the file ``marker`` (what an attacker's code could do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_payload(path, marker) -> None:
    with open(path, "wb") as handle:
        pickle.dump({"model": _Payload(str(marker))}, handle)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2))


def test_pickled_payload_does_not_run_and_the_error_names_the_key(tmp_path):
    weights, marker = tmp_path / "weights.pkl", tmp_path / "pwned"
    _write_payload(weights, marker)
    with pytest.raises(
        UntrustedWeightsError, match=rf"weights.pkl.*runs any code.*{OPT_IN_KEY} True"
    ):
        SafeDetectionCheckpointer(_model()).load(str(weights))
    with pytest.raises(UntrustedWeightsError, match=OPT_IN_KEY):
        load_model_weights(_model(), str(weights) + "?matching_heuristics=True")
    assert not marker.exists()


def test_trainer_refuses_pickled_model_weights(handful_lvis, tmp_path):
    weights, marker = tmp_path / "weights.pkl", tmp_path / "pwned"
    _write_payload(weights, marker)
    opts = [
        "DATASETS.TRAIN", f"('{handful_lvis['train']}',)", "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.NUM_CLASSES", "4", "MODEL.WEIGHTS", str(weights),
        "OUTPUT_DIR", str(tmp_path / "out"),
    ]  # fmt: skip
    trainer = EQLv2Trainer(setup_cfg(TINY, opts))
    assert isinstance(trainer.checkpointer, SafeDetectionCheckpointer)
    with pytest.raises(UntrustedWeightsError, match=OPT_IN_KEY):
        trainer.resume_or_load(resume=False)
    assert not marker.exists()


def test_opted_in_pickle_loads(tmp_path):
    model = _model()
    weights = tmp_path / "trusted.pkl"
    state = {k: v.numpy() + 1.0 for k, v in model.state_dict().items()}
    with open(weights, "wb") as handle:
        pickle.dump({"model": state, "__author__": "test"}, handle)
    SafeDetectionCheckpointer(model, allow_pickle=True).load(str(weights))
    np.testing.assert_array_equal(model.state_dict()["0.weight"].numpy(), state["0.weight"])


def test_pth_checkpoint_loads_weights_only(tmp_path):
    source = _model()
    with torch.no_grad():
        source[0].weight += 1.0
    SafeDetectionCheckpointer(source, str(tmp_path)).save("model_final", iteration=7)
    target = _model()
    extra = SafeDetectionCheckpointer(target).load(str(tmp_path / "model_final.pth"))
    assert extra["iteration"] == 7
    assert torch.equal(target[0].weight, source[0].weight)


def test_pth_with_a_pickled_payload_is_not_run(tmp_path):
    # torch.load's weights-only default is what keeps .pth files safe: this fails if it changes.
    weights, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    torch.save({"model": _Payload(str(marker))}, weights)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        SafeDetectionCheckpointer(_model()).load(str(weights))
    assert not marker.exists()


def test_weights_only_switched_off_by_environment_is_refused(tmp_path, monkeypatch):
    weights = tmp_path / "model.pth"
    torch.save({"model": _model().state_dict()}, weights)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UntrustedWeightsError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set"):
        SafeDetectionCheckpointer(_model()).load(str(weights))
    SafeDetectionCheckpointer(_model(), allow_pickle=True).load(str(weights))


def test_detectron2_model_zoo_pickles_are_trusted():
    from eqlv2.engine.checkpoint import check_weights_source

    check_weights_source("detectron2://ImageNetPretrained/MSRA/R-50.pkl", allow_pickle=False)
    with pytest.raises(UntrustedWeightsError):
        check_weights_source("https://example.com/detectron2/R-50.pkl", allow_pickle=False)
