"""The options of a search: the command line of ``tune/search.py``, whose argparse destinations are
the field names of :class:`SearchOptions`."""

from __future__ import annotations

from dataclasses import dataclass, fields


class SearchInputError(ValueError):
    """A search input is invalid; the message is one line naming the flag, file or parameter."""


#: Losses ``--baseline`` accepts (of ``eqlv2.losses.LOSS_NAMES``; here, ``--help`` imports no torch).
BASELINE_LOSSES = ("sigmoid", "softmax", "eqlv1", "federated")


@dataclass
class SearchOptions:
    """What to search, how to run it and where results go (see ``tune/search.py --help``)."""

    search_space: str = "configs/search/default.yaml"
    datasets: tuple[str, ...] = ("lvis",)
    config_files: tuple[str, ...] = ()
    opts: tuple[str, ...] = ()
    num_trials: int | None = None  # default: 3 with --smoke, else 2 (plus the reference trials)
    concurrency: int = 2
    workers_per_trial: int | None = None
    cpus_per_worker: int = 1
    use_gpu: bool = False
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    sampler: str = "tpe"
    metric: str = "AP"
    multi_objective: bool = False
    results_dir: str = "eqlv2_runs"
    storage_path: str | None = None
    name: str | None = None
    mlflow_uri: str | None = None
    mlflow_experiment: str = "eqlv2-search"
    optuna_storage: str | None = None
    study_name: str | None = None
    resume: bool = False
    smoke: bool = False
    seed: int = 42
    max_failures: int = 0
    ray_address: str | None = None
    num_cpus: int | None = None
    baseline: str = "sigmoid"  # loss of the reference trial, or "none"
    noise_seeds: int = 2  # further seeds of the paper point (the noise band)
    baseline_gradients: tuple[str, ...] = ()
    verbose: bool = False
    sync: bool = False  # replay the MLflow outbox of results_dir instead of searching
    argv: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for item in fields(self):
            if item.type.startswith("tuple"):
                setattr(self, item.name, tuple(getattr(self, item.name)))
        if self.num_trials is None:
            self.num_trials = 3 if self.smoke else 2
