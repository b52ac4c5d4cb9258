"""Config keys of the eqlv2 project, added to a detectron2 config by :func:`add_eqlv2_config`."""

from __future__ import annotations

from detectron2.config import CfgNode as CN

from eqlv2.losses import LOSS_NAMES  # the values MODEL.EQLV2.LOSS accepts (re-exported)

__all__ = ["LOSS_NAMES", "add_eqlv2_config"]


def add_eqlv2_config(cfg: CN) -> None:
    """Add the keys of EQL v2, its baselines and the project's data and logging options to ``cfg``."""
    _add_model_keys(cfg)
    _add_dataset_keys(cfg)
    _add_test_keys(cfg)


def _add_model_keys(cfg: CN) -> None:
    """``MODEL.EQLV2``: the classification loss, its hyperparameters and the initial weights."""
    cfg.MODEL.EQLV2 = CN()
    # Classification loss of the box head, one of LOSS_NAMES:
    #   "eqlv2"     Equalization Loss v2 (Tan et al. 2021), sigmoid with gradient-guided reweighing
    #   "softmax"   detectron2's default softmax cross-entropy
    #   "sigmoid"   plain sigmoid binary cross-entropy over the C category columns
    #   "eqlv1"     Equalization Loss (Tan et al. 2020): tail categories get no negative gradient
    #               from foreground proposals
    #   "federated" detectron2's federated sigmoid loss (Zhou et al. 2021)
    #   "eqlv2_2c_softmax" EQL v2 on the 2C-softmax classifier of section 4.8 / Table 9: two logits
    #               per category (and for the agnostic task), a softmax over each pair, the same
    #               gradient-guided reweighing; the box classifier gets 2(C+1) outputs
    cfg.MODEL.EQLV2.LOSS = "eqlv2"
    # Slope of the mapping function f(x) = 1 / (1 + exp(-gamma * (x - mu))) (eq. 6). Must be > 0.
    cfg.MODEL.EQLV2.GAMMA = 12.0
    # Centre of the mapping function (eq. 6): the gradient ratio at which r = 0.5.
    cfg.MODEL.EQLV2.MU = 0.8
    # Strength of positive up-weighting, q = 1 + alpha * (1 - f(g)) (eq. 5). Must be >= 0.
    cfg.MODEL.EQLV2.ALPHA = 4.0
    # GAMMA, MU, ALPHA and the switches below apply to "eqlv2" and "eqlv2_2c_softmax".
    # Ablation switches (Table 2, Table 9): the category-agnostic (objectness) task of section 3.3,
    # negative down-weighting by r, positive up-weighting by q.
    cfg.MODEL.EQLV2.USE_AGNOSTIC_TASK = True
    cfg.MODEL.EQLV2.NEG_DOWN_WEIGHT = True
    cfg.MODEL.EQLV2.POS_UP_WEIGHT = True
    # Prior probability used to initialise every sigmoid classification bias to -log((1-p)/p)
    # (section 4.2). Ignored by the softmax loss, which keeps detectron2's zero bias.
    cfg.MODEL.EQLV2.PRIOR_PROB = 0.001
    # Initial probability of the background column C (the agnostic task's logit, target 1 on
    # background proposals): the background share of a sampled batch,
    # 1 - ROI_HEADS.POSITIVE_FRACTION. Starting it at PRIOR_PROB instead (0.001, as results before
    # 2026-12 did) lets the agnostic task's loss swamp the classifier's first iterations and
    # costs AP on short schedules (README, "Results").
    cfg.MODEL.EQLV2.BACKGROUND_PRIOR_PROB = 0.75
    # EQL v1: categories whose training image frequency (images containing it / all images) is
    # below LAMBDA are tail categories and get no negative gradients from foreground proposals.
    cfg.MODEL.EQLV2.EQLV1_LAMBDA = 1.76e-3
    # Federated loss: number of classes sampled per iteration and the power of the image-count
    # weights used to sample them (detectron2's defaults for LVIS).
    cfg.MODEL.EQLV2.FED_LOSS_NUM_CLASSES = 50
    cfg.MODEL.EQLV2.FED_LOSS_FREQ_WEIGHT_POWER = 0.5
    # Every LOG_PERIOD iterations the gradient-statistics hook writes summaries (mean positive /
    # negative ratio per frequency group, mean q and r) to detectron2's EventStorage. 0 disables it.
    cfg.MODEL.EQLV2.LOG_PERIOD = 20
    # Loading weights in pickle format (.pkl: Detectron / Caffe2 model-zoo files) RUNS ANY CODE the
    # file carries. Such files are refused unless this is True, except detectron2's own model zoo
    # (detectron2://...). Set it only for files you trust. .pth files are loaded weights-only (no code).
    cfg.MODEL.EQLV2.ALLOW_UNSAFE_PICKLED_WEIGHTS = False
    # Offline stand-in for the paper's ImageNet-pretrained backbone: a detectron2 config (a path;
    # relative paths are looked up from the working directory, then from the repository) whose
    # training run gives this model its initial weights -- backbone, RPN, box and mask heads, box
    # regression and mask predictors copied to every category; the classifier starts afresh.
    # The run happens once and is cached under <benchmark root>/base_checkpoints/, keyed by a
    # digest of its config, the benchmark's generation parameters and the library versions
    # (see eqlv2.engine.base_checkpoint). Used only when MODEL.WEIGHTS is empty. Empty: none.
    cfg.MODEL.EQLV2.BASE_CHECKPOINT_CONFIG = ""


def _add_dataset_keys(cfg: CN) -> None:
    """``DATASETS.EQLV2``: a user's own LVIS-format dataset and the offline benchmark."""
    cfg.DATASETS.EQLV2 = CN()
    # A user's own LVIS-format dataset, registered as "<NAME>_train" / "<NAME>_val" before training:
    # the name prefix, the train/val JSON files and their image folders. Empty NAME disables it.
    cfg.DATASETS.EQLV2.CUSTOM_NAME = ""
    cfg.DATASETS.EQLV2.CUSTOM_TRAIN_JSON = ""
    cfg.DATASETS.EQLV2.CUSTOM_TRAIN_IMAGES = ""
    cfg.DATASETS.EQLV2.CUSTOM_VAL_JSON = ""
    cfg.DATASETS.EQLV2.CUSTOM_VAL_IMAGES = ""
    # Root folder of the generated offline benchmark; empty means $EQLV2_SYNTHETIC_ROOT or
    # $DETECTRON2_DATASETS/eqlv2_synthetic (default ./datasets/eqlv2_synthetic).
    cfg.DATASETS.EQLV2.SYNTHETIC_ROOT = ""
    # Train on every annotation as one category (class-agnostic detection, MODEL.ROI_HEADS.
    # NUM_CLASSES 1): how the base checkpoint (MODEL.EQLV2.BASE_CHECKPOINT_CONFIG) is trained, so
    # that it learns objects, boxes and masks without the long tail of the categories.
    cfg.DATASETS.EQLV2.CLASS_AGNOSTIC = False


def _add_test_keys(cfg: CN) -> None:
    """``TEST.EQLV2``: the evaluation engine, tasks and images."""
    cfg.TEST.EQLV2 = CN()
    # LVIS evaluation engine: "fast" (faster-coco-eval, sharded) or "lvis" (the official API).
    cfg.TEST.EQLV2.LVIS_ENGINE = "fast"
    # False: a mask model (MODEL.MASK_ON) is trained with its mask head but evaluated on boxes only,
    # its mask head skipped at inference. On a CPU, predicting and pasting 300 masks per image
    # costs about 10x the box inference; the offline default search trial uses it (box AP).
    cfg.TEST.EQLV2.EVALUATE_MASKS = True
    # 0: every image of each test set. N > 0: its first N images only (in the loader's order), the
    # ground truth restricted to them, for quick checks such as ``tune/search.py --smoke``. Such
    # numbers are not comparable with those of the whole set.
    cfg.TEST.EQLV2.MAX_IMAGES = 0
