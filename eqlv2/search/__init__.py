"""Hyper-parameter search of EQL v2 with Ray Tune + Optuna, tracked in MLflow (``tune/search.py``).

Needs the ``cluster`` extra (Ray, Optuna, MLflow); the rest of :mod:`eqlv2` never imports this
package. Modules by the process that runs them (the picture is in the README's Layout section):

* driver: :mod:`~eqlv2.search.driver` (:func:`~eqlv2.search.driver.run_search`, a pipeline of
  named steps), :mod:`~eqlv2.search.options`, :mod:`~eqlv2.search.space`,
  :mod:`~eqlv2.search.settings`, :mod:`~eqlv2.search.stores` (store URLs),
  :mod:`~eqlv2.search.optuna_study` (the study's only writer), :mod:`~eqlv2.search.scheduling`
  (ASHA), :mod:`~eqlv2.search.mlflow_driver` (parent run, every trial run's final state),
  :mod:`~eqlv2.search.ranking` (the ranked table);
* trial process: :mod:`~eqlv2.search.trial` (the trainable: one Ray Train run per dataset);
* rank-0 Ray Train worker: :mod:`~eqlv2.search.mlflow_worker` (metrics and artifacts of a
  trial run);
* everywhere: :mod:`~eqlv2.search.mlflow_client` (MLflow calls that never raise) and
  :mod:`~eqlv2.search.plots`.
"""
