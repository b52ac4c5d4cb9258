"""Hyper-parameter search of EQL v2 with Ray Tune + Optuna, tracked in MLflow (``tune/search.py``).

Needs the ``cluster`` extra. The modules by the process that runs them are pictured in the
README's Layout section: the driver (:mod:`~eqlv2.search.driver`), the trial process
(:mod:`~eqlv2.search.trial`) and the rank-0 Ray Train worker (:mod:`~eqlv2.search.mlflow_worker`).
"""
