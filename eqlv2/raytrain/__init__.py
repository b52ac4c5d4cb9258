"""Ray Train for the project: multi-worker, multi-node detectron2 EQL v2 training (``cluster`` extra).

The driver runs :mod:`~eqlv2.raytrain.launch` (:func:`~eqlv2.raytrain.launch.build_torch_trainer`)
and :mod:`~eqlv2.raytrain.checks`; every worker runs :mod:`~eqlv2.raytrain.worker`. Example::

    from eqlv2.raytrain.launch import build_torch_trainer

    trainer = build_torch_trainer("configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml", ["SOLVER.MAX_ITER", "100"],
                                  num_workers=2, storage_path="ray_results")
    result = trainer.fit()   # result.metrics: the final report; result.checkpoint: the last one
"""
