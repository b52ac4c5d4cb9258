"""Post-install check: detectron2 imports at the pinned version and a Mask R-CNN forward runs.

Run by ``scripts/setup.sh``; exits non-zero with a message naming what failed.
"""

from __future__ import annotations

import sys

EXPECTED_VERSION = "0.7.2"


def main() -> int:
    import detectron2
    import torch
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    if detectron2.__version__ != EXPECTED_VERSION:
        print(f"check: detectron2 {detectron2.__version__} found, expected {EXPECTED_VERSION}")
        return 1
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg).eval()
    image = torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8).float()
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 128, "width": 160}])
    if "instances" not in out:
        print("check: Mask R-CNN forward returned no 'instances'")
        return 1
    print(f"check: detectron2 {detectron2.__version__} at {detectron2.__file__}; Mask R-CNN forward ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
