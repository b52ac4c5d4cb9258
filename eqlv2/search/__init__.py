"""Hyper-parameter search of EQL v2 with Ray Tune + Optuna, tracked in MLflow (``tune/search.py``).

Needs the ``cluster`` extra (Ray, Optuna, MLflow). The rest of :mod:`eqlv2` never imports this
package. Modules, one job each:

* :mod:`~eqlv2.search.space` — the search space from a YAML file of ``configs/search/``;
* :mod:`~eqlv2.search.settings` — datasets, the objective (``AP``, ``APr``, weighted mixes) and the
  picklable settings every trial gets;
* :mod:`~eqlv2.search.optuna_bookkeeping` — the study in its database, seed points, and
  ``TrialStateOptunaSearch`` (stopped trials PRUNED, errors FAIL, orphans of a killed driver FAIL);
* :mod:`~eqlv2.search.scheduling` — ASHA on the intermediate objective;
* :mod:`~eqlv2.search.trial` — the Tune trainable: one Ray Train run per dataset per trial;
* :mod:`~eqlv2.search.mlflow_tracking` — parent / child runs, the rank-0 training hook, closing runs;
* :mod:`~eqlv2.search.placement_groups` — releasing the Ray resources of trials stopped early;
* :mod:`~eqlv2.search.report` — the ranked table and the best configuration;
* :mod:`~eqlv2.search.plots` — gradient-ratio, weight-norm and Optuna figures;
* :mod:`~eqlv2.search.runner` — the driver, :func:`~eqlv2.search.runner.run_search`.
"""
