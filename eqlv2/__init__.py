"""EQL v2 for long-tailed detection on detectron2."""
__version__ = "0.1.0"
