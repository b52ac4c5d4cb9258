"""A detectron2 checkpointer that does not run code hidden in untrusted weight files.

detectron2's ``DetectionCheckpointer`` reads ``.pkl`` files (Detectron / Caffe2 model-zoo format)
with ``pickle.load``, which runs whatever code the file carries before any weight is looked at.
Other files (``.pth``) go through ``torch.load``, which since torch 2.6 unpickles only tensors and
plain containers (``weights_only=True``) unless the environment variable
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` turns that off.

:class:`SafeDetectionCheckpointer` refuses, before anything is read:

* a ``.pkl`` file, unless it comes from detectron2's own model zoo (``detectron2://...`` or its
  download address, :data:`TRUSTED_PICKLE_PREFIXES`; trusting them is trusting the installed
  detectron2) or the user opts in with ``MODEL.EQLV2.ALLOW_UNSAFE_PICKLED_WEIGHTS True``;
* any file while ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set, unless the user opts in likewise.

Everything else (``.pth`` checkpoints of this project, resuming, saving) works as in detectron2.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import urlparse

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode

__all__ = [
    "OPT_IN_KEY",
    "TRUSTED_PICKLE_PREFIXES",
    "SafeDetectionCheckpointer",
    "UntrustedWeightsError",
    "check_weights_source",
]

logger = logging.getLogger(__name__)

#: The config key that lets pickled weights be unpickled (see eqlv2.config).
OPT_IN_KEY = "MODEL.EQLV2.ALLOW_UNSAFE_PICKLED_WEIGHTS"
#: Where pickled weights are trusted without the opt-in: detectron2's model zoo.
TRUSTED_PICKLE_PREFIXES = ("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/")
_NO_WEIGHTS_ONLY_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UntrustedWeightsError(RuntimeError):
    """A weight file would be unpickled with arbitrary code execution and nobody opted in."""


def _is_pickle(path: str) -> bool:
    # detectron2's rule: the file name without the URL query ends in ".pkl".
    return urlparse(path)._replace(query="").geturl().endswith(".pkl")


def check_weights_source(path: str, allow_pickle: bool) -> None:
    """Raise unless loading ``path`` is safe or the user opted in (see the module doc).

    Raises:
        UntrustedWeightsError: naming the file and :data:`OPT_IN_KEY`.
    """
    if allow_pickle:
        return
    if _is_pickle(path) and not path.startswith(TRUSTED_PICKLE_PREFIXES):
        raise UntrustedWeightsError(
            f"refusing to load the pickled weights {path!r}: unpickling a .pkl file runs any "
            f"code it contains. Convert it to a .pth state dict, or, only for a file you trust, "
            f"set {OPT_IN_KEY} True."
        )
    if os.environ.get(_NO_WEIGHTS_ONLY_ENV, "0").lower() in ("1", "y", "yes", "true"):
        raise UntrustedWeightsError(
            f"refusing to load {path!r}: {_NO_WEIGHTS_ONLY_ENV} is set, so torch.load would "
            f"unpickle arbitrary code. Unset it, or, only for files you trust, set {OPT_IN_KEY} "
            "True."
        )


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose :meth:`load` first applies :func:`check_weights_source`.

    Args:
        allow_pickle: the value of ``MODEL.EQLV2.ALLOW_UNSAFE_PICKLED_WEIGHTS``.
        Other arguments: as ``DetectionCheckpointer``.
    """

    def __init__(
        self, model, save_dir: str = "", *, allow_pickle: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(model, save_dir, **kwargs)
        self.allow_pickle = allow_pickle

    @classmethod
    def from_config(
        cls, cfg: CfgNode, model, save_dir: str = "", **kwargs: Any
    ) -> SafeDetectionCheckpointer:
        """A checkpointer that allows pickles as ``cfg.MODEL.EQLV2.ALLOW_UNSAFE_PICKLED_WEIGHTS``
        says (False for a config without the project's keys)."""
        eqlv2 = cfg.MODEL.get("EQLV2")
        allow = bool(eqlv2.get("ALLOW_UNSAFE_PICKLED_WEIGHTS", False)) if eqlv2 else False
        return cls(model, save_dir, allow_pickle=allow, **kwargs)

    def load(self, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if path:
            check_weights_source(path, self.allow_pickle)
            if self.allow_pickle and _is_pickle(path):
                logger.warning("Unpickling %s: %s is True", path, OPT_IN_KEY)
        return super().load(path, *args, **kwargs)
