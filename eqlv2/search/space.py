"""The hyper-parameter search space, read from a YAML file in ``configs/search/``.

A search-space file names, for each hyper-parameter of EQL v2 (``gamma``, ``mu``, ``alpha``; any
other detectron2 config key may be given by its full dotted name), either a range to search or a
fixed value, and the points to evaluate first::

    _BASE_: default.yaml            # optional: a file (next to this one, else in configs/search/)
                                    # whose top-level fields this file's replace
    params:
      gamma: {low: 4.0, high: 16.0, log: false}
      mu:    {low: 0.5, high: 1.0}
      alpha: {low: 0.0, high: 8.0}
    fixed: {}                       # e.g. {alpha: 4.0}: not searched, applied to every trial
    seed_points:                    # evaluated first, unless the study already holds them
      - {gamma: 12.0, mu: 0.8, alpha: 4.0}
    trial_overrides:                # detectron2 KEY: VALUE applied to every trial (its budget)
      SOLVER.MAX_ITER: 100

A parameter entry is ``{low, high}`` (``type: float`` or ``int``; ``log: true`` for a
log-uniform draw, ``step`` for a grid) or ``{choices: [...]}``; it is kept as the Optuna
distribution it describes.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from .options import SearchInputError

logger = logging.getLogger(__name__)

#: Short names of the EQL v2 hyper-parameters and the detectron2 config keys they set.
CONFIG_KEYS: dict[str, str] = {"gamma": "MODEL.EQLV2.GAMMA", "mu": "MODEL.EQLV2.MU", "alpha": "MODEL.EQLV2.ALPHA"}

#: The paper's setting (Tan et al. 2021, Tables 7-8): evaluated first by default.
PAPER_SETTING: dict[str, float] = {"gamma": 12.0, "mu": 0.8, "alpha": 4.0}

#: Valid values of each EQL v2 hyper-parameter (paper, eq. 6-8): the slope ``gamma`` of the
#: mapping function positive, the positive up-weighting ``alpha`` non-negative, the centre ``mu`` finite.
PARAMETER_DOMAINS = {
    "gamma": ("gamma > 0", lambda v: math.isfinite(v) and v > 0),
    "alpha": ("alpha >= 0", lambda v: math.isfinite(v) and v >= 0),
    "mu": ("mu finite", math.isfinite),
}

_PARAM_FIELDS = {"type", "low", "high", "log", "step", "choices"}
_TOP_LEVEL_FIELDS = {"params", "fixed", "seed_points", "trial_overrides", "description"}
#: The shipped search spaces: where a `_BASE_` not found next to its file is looked for.
_SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "search"

#: A searched parameter: a range (``low`` and ``high`` inclusive; ``step`` None: continuous) or choices.
Distribution = FloatDistribution | IntDistribution | CategoricalDistribution


class SearchSpaceError(SearchInputError):
    """A search-space file or mapping is malformed; the message names the offending entry."""


def config_key(name: str) -> str:
    """The detectron2 config key a parameter name sets (``gamma`` → ``MODEL.EQLV2.GAMMA``)."""
    if name in CONFIG_KEYS:
        return CONFIG_KEYS[name]
    if "." in name and name.upper() == name:
        return name
    raise SearchSpaceError(f"unknown parameter {name!r}: use one of {sorted(CONFIG_KEYS)} or a full config key such as SOLVER.BASE_LR")


def contains(distribution: Distribution, value: Any) -> bool:
    """Whether ``value`` is one of the choices, or inside the range (to a relative 1e-9)."""
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    low, high = distribution.low, distribution.high
    tolerance = 1e-9 * max(1.0, abs(high - low))
    return low - tolerance <= number <= high + tolerance


def describe(distribution: Distribution) -> str:
    """E.g. ``uniform[4, 16]``, ``int log-uniform[2, 8]``, ``choice[0.01, 0.02]``."""
    if isinstance(distribution, CategoricalDistribution):
        return f"choice{list(distribution.choices)}"
    is_int = isinstance(distribution, IntDistribution)
    step = distribution.step if not is_int or distribution.step != 1 else None
    scale = "log-uniform" if distribution.log else "uniform"
    return f"{'int ' if is_int else ''}{scale}[{distribution.low:g}, {distribution.high:g}]{f' step {step}' if step else ''}"


@dataclass(frozen=True)
class SearchSpace:
    """Searched parameters (in file order), fixed values, seed points (assignments of the searched
    names), the ``KEY VALUE`` overrides every trial applies before the command line's, and the
    file the space was read from."""

    params: dict[str, Distribution]
    fixed: dict[str, Any] = field(default_factory=dict)
    seed_points: tuple[dict[str, Any], ...] = ()
    trial_overrides: tuple[str, ...] = ()
    source: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def all_names(self) -> list[str]:
        return list(self.params) + [name for name in self.fixed if name not in self.params]

    def optuna_distributions(self) -> dict[str, Distribution]:
        return dict(self.params)

    def complete(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's full assignment: the sampled values plus the fixed ones."""
        missing = [name for name in self.params if name not in sampled]
        if missing:
            raise SearchSpaceError(f"trial config lacks searched parameters {missing}")
        values = {name: sampled[name] for name in self.params}
        values.update({name: value for name, value in self.fixed.items() if name not in values})
        return values

    def config_overrides(self, values: Mapping[str, Any]) -> list[str]:
        """detectron2 ``KEY VALUE`` overrides that apply a full assignment."""
        opts: list[str] = []
        for name, value in values.items():
            if name in CONFIG_KEYS:  # the EQL v2 keys are floats: yacs does not coerce int → float
                value = float(value)
            opts += [config_key(name), _override_text(value)]
        return opts

    def describe(self) -> dict[str, str]:
        """``{name: description}`` of every parameter, fixed ones included."""
        out = {name: describe(distribution) for name, distribution in self.params.items()}
        out.update({name: f"fixed {value}" for name, value in self.fixed.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        """The space in the file format."""
        params: dict[str, Any] = {}
        for name, dist in self.params.items():
            if isinstance(dist, CategoricalDistribution):
                params[name] = {"choices": list(dist.choices)}
            else:
                kind = "int" if isinstance(dist, IntDistribution) else "float"
                entry = {"type": kind, "low": dist.low, "high": dist.high, "log": dist.log, "step": dist.step}
                params[name] = {key: value for key, value in entry.items() if value is not None}
        return {
            "params": params,
            "fixed": dict(self.fixed),
            "seed_points": [dict(point) for point in self.seed_points],
            "trial_overrides": dict(zip(self.trial_overrides[::2], self.trial_overrides[1::2], strict=True)),
        }


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else None (a metric, a parameter value)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def same_assignment(a: Mapping[str, Any], b: Mapping[str, Any] | None) -> bool:
    """Whether two parameter assignments are equal (numbers compared to a relative 1e-9)."""
    if b is None or set(a) != set(b):
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, int | float) and isinstance(other, int | float):
            if not math.isclose(float(value), float(other), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif value != other:
            return False
    return True


def _override_text(value: Any) -> str:
    """A value as detectron2's ``merge_from_list`` parses it back (via ``literal_eval``)."""
    return repr(value) if isinstance(value, float) and not isinstance(value, bool) else str(value)


def _yaml_value_text(value: Any) -> str:
    """A YAML value as detectron2's ``merge_from_list`` reads it (lists become tuples)."""
    if isinstance(value, list | tuple):
        items = ", ".join(_yaml_value_text(item) for item in value)
        return f"({items},)" if len(value) == 1 else f"({items})"
    if isinstance(value, str):
        return value
    return _override_text(value)


def _parse_param(name: str, entry: Any) -> Distribution:
    if not isinstance(entry, Mapping):
        raise SearchSpaceError(f"params.{name} must be a mapping such as {{low: 0, high: 8}}, got {entry!r}")
    unknown = set(entry) - _PARAM_FIELDS
    if unknown:
        raise SearchSpaceError(f"params.{name} has unknown fields {sorted(unknown)}")
    if "choices" in entry:
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"params.{name}.choices must be a non-empty list")
        return CategoricalDistribution(choices)
    kind = str(entry.get("type", "float"))
    if kind not in ("float", "int"):
        raise SearchSpaceError(f"params.{name}.type must be float or int, got {kind!r}")
    if "low" not in entry or "high" not in entry:
        raise SearchSpaceError(f"params.{name} needs low and high (or choices)")
    try:
        low, high = float(entry["low"]), float(entry["high"])
    except (TypeError, ValueError) as error:
        raise SearchSpaceError(f"params.{name}: low and high must be numbers ({error})") from error
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise SearchSpaceError(f"params.{name}: need finite low < high, got [{low}, {high}]")
    log = bool(entry.get("log", False))
    if log and low <= 0:
        raise SearchSpaceError(f"params.{name}: a log scale needs low > 0, got low={low:g} (use a uniform scale or a positive lower bound)")
    step = entry.get("step")
    if step is not None:
        step = float(step)
        if step <= 0:
            raise SearchSpaceError(f"params.{name}.step must be > 0")
        if log:
            raise SearchSpaceError(f"params.{name}: step and log cannot be combined")
    if kind == "int":
        return IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    return FloatDistribution(low, high, log=log, step=step)


def _parse_seed_points(points: Any, params: Mapping[str, Distribution], fixed: Mapping[str, Any], where: str) -> list[dict]:
    """The distinct seed points, each a full assignment of the searched parameters, in range
    (fixed parameters it names, e.g. the paper's full setting while alpha is fixed, are dropped)."""
    seeds: list[dict] = []
    for index, point in enumerate(points):
        if not isinstance(point, Mapping):
            raise SearchSpaceError(f"seed_points[{index}] must be a mapping{where}")
        seed = {}
        for name, dist in params.items():
            if name not in point:
                raise SearchSpaceError(f"seed_points[{index}] lacks searched parameter {name!r}{where}")
            if not contains(dist, point[name]):
                raise SearchSpaceError(f"seed_points[{index}].{name}={point[name]!r} is outside {describe(dist)}{where}")
            value = point[name]
            seed[name] = int(value) if isinstance(dist, IntDistribution) else value if isinstance(dist, CategoricalDistribution) else float(value)
        extra = set(point) - set(params) - set(fixed)
        if extra:
            raise SearchSpaceError(f"seed_points[{index}] names unknown parameters {sorted(extra)}{where}")
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def _parse_trial_overrides(raw: Any, names: list[str], where: str) -> list[str]:
    """``KEY VALUE`` overrides from a mapping of config keys (none of them a parameter's)."""
    if not isinstance(raw, Mapping):
        raise SearchSpaceError(f"trial_overrides must be a mapping of config keys to values{where}")
    overrides: list[str] = []
    for key, value in raw.items():
        key = str(key)
        if "." not in key or key.upper() != key:
            raise SearchSpaceError(f"trial_overrides: {key!r} is not a detectron2 config key{where}")
        if key in {config_key(name) for name in names}:
            raise SearchSpaceError(f"trial_overrides: {key} is a searched or fixed parameter{where}")
        overrides += [key, _yaml_value_text(value)]
    return overrides


def check_domains(space: SearchSpace) -> None:
    """Checks every value ``space`` can give ``gamma``, ``mu`` or ``alpha`` (range bounds, choices,
    fixed values); the error names the file and the parameter."""
    where = space.source or "search space"
    for name, value in [*space.params.items(), *space.fixed.items()]:
        short = next((short for short, key in CONFIG_KEYS.items() if name in (short, key)), None)
        rule, accepts = PARAMETER_DOMAINS.get(short, (None, None))
        if rule is None:
            continue
        if isinstance(value, FloatDistribution | IntDistribution):
            for bound in (bound for bound in ("low", "high") if not accepts(float(getattr(value, bound)))):
                raise SearchSpaceError(
                    f"{where}: params.{name} range [{value.low:g}, {value.high:g}] is invalid: its {bound} "
                    f"{getattr(value, bound):g} breaks {rule}"
                )
            continue
        what, candidates = ("choice", value.choices) if isinstance(value, CategoricalDistribution) else ("fixed value", [value])
        for candidate in candidates:
            with contextlib.suppress(TypeError, ValueError):
                if not isinstance(candidate, bool) and accepts(float(candidate)):
                    continue
            raise SearchSpaceError(f"{where}: {what} {name}={candidate!r} is invalid: EQL v2 needs {rule}")


def parse_search_space(data: Mapping[str, Any], source: str | None = None) -> SearchSpace:
    """Validates a search-space mapping (the parsed YAML file); errors name the bad entry."""
    where = f" in {source}" if source else ""
    if not isinstance(data, Mapping):
        raise SearchSpaceError(f"a search space must be a mapping{where}")
    unknown = set(data) - _TOP_LEVEL_FIELDS
    if unknown:
        raise SearchSpaceError(f"unknown top-level fields {sorted(unknown)}{where}")
    raw_params = data.get("params") or {}
    raw_fixed = data.get("fixed") or {}
    if not isinstance(raw_params, Mapping) or not isinstance(raw_fixed, Mapping):
        raise SearchSpaceError(f"params and fixed must be mappings{where}")
    try:
        params = {str(name): _parse_param(str(name), entry) for name, entry in raw_params.items()}
        for name in list(params) + list(raw_fixed):
            config_key(str(name))
    except SearchSpaceError as error:
        raise SearchSpaceError(f"{error}{where}") from None
    fixed = {str(name): value for name, value in raw_fixed.items()}
    both = sorted(set(params) & set(fixed))
    if both:
        raise SearchSpaceError(f"parameters {both} are both searched and fixed{where}")
    if not params:
        raise SearchSpaceError(
            f"nothing to search{where}: every parameter is fixed. Train the fixed setting with train/ray_train.py, "
            "or give at least one parameter a range"
        )
    seeds = _parse_seed_points(data.get("seed_points") or [], params, fixed, where)
    overrides = _parse_trial_overrides(data.get("trial_overrides") or {}, list(params) + list(fixed), where)
    space = SearchSpace(params, fixed, tuple(seeds), tuple(overrides), source)
    check_domains(space)
    return space


def _read(path: Path) -> Any:
    """The file's YAML, on top of its ``_BASE_`` file's (whose top-level fields it replaces)."""
    if not path.is_file():
        raise SearchSpaceError(f"--search-space: search-space file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SearchSpaceError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if isinstance(data, Mapping) and "_BASE_" in data:
        base = path.parent / str(data["_BASE_"])  # else the shipped one (a copied file keeps its base)
        base = base if base.is_file() else _SHIPPED / str(data["_BASE_"])
        data = {**_read(base), **{key: value for key, value in data.items() if key != "_BASE_"}}
    return data


def load_search_space(path: str | Path) -> SearchSpace:
    """Reads and validates a search-space YAML file; a one-line SearchSpaceError names the file."""
    path = Path(path)
    space = parse_search_space(_read(path), source=str(path))
    logger.info("Search space from %s: %s", path, space.describe())
    return space
