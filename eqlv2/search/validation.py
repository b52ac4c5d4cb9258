"""Checks of a search's inputs that run on the driver before the first trial starts.

Every check is a pure function (apart from :func:`prepare_writable_dir`, which creates the folder
it checks) and raises :class:`SearchInputError` with a one-line message that names the flag, the
file or the parameter at fault, so that ``tune/search.py`` can print it and exit at once instead of
failing inside Ray Train minutes later.

* :func:`strict_objective` (built on :func:`parse_metric_strict`) — the ``--metric`` grammar,
  strictly: ``AP+`` or ``AP++APr`` are refused instead of being read as ``AP``
  (``settings.parse_objective`` skips empty terms). It replaces ``parse_objective`` on the driver:
  it returns the same :class:`~eqlv2.search.settings.Objective` for every expression that one
  reads correctly, and also reads signed exponents (``1e-1*AP``), which ``parse_objective``
  splits at their ``-``.
* :func:`check_search_space` / :func:`load_checked_search_space` — every searched range, fixed
  value, categorical choice and seed point of ``gamma``, ``mu`` and ``alpha`` inside the values
  EQL v2 accepts (``gamma > 0``, ``alpha >= 0``, ``mu`` finite), naming the file and the parameter.
* :func:`prepare_writable_dir` — a results or storage folder created and proven writable by
  writing a file in it (``os.access`` says yes to root even on an immutable folder).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import Objective
from .space import CONFIG_KEYS, SearchSpace, SearchSpaceError, load_search_space

__all__ = [
    "PARAMETER_DOMAINS",
    "SearchInputError",
    "check_search_space",
    "load_checked_search_space",
    "parse_metric_strict",
    "prepare_writable_dir",
    "strict_objective",
]


class SearchInputError(ValueError):
    """A search input is invalid; the message is one line naming the flag, file or parameter."""


# --- --metric ---------------------------------------------------------------------------------

#: One token of a metric expression: a number, a metric name, ``*``, ``+``/``-``, or anything else.
_TOKEN = re.compile(
    r"\s*(?:(?P<number>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
    r"|(?P<name>[A-Za-z][A-Za-z0-9_]*)|(?P<times>\*)|(?P<sign>[+-])|(?P<other>\S))"
)
_EXAMPLES = "use e.g. AP, APr or 0.5*AP+0.5*APr"


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """``(kind, text, column)`` of every token of ``text``."""
    out = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind is not None:
            out.append((kind, match.group(kind), match.start(kind)))
    return out


def parse_metric_strict(
    text: str, known: Iterable[str] | None = None
) -> tuple[tuple[float, str], ...]:
    """Reads ``--metric`` with the grammar ``[sign] term (sign term)*``, ``term = [number '*'] NAME``.

    Args:
        text: the expression, e.g. ``AP`` or ``0.5*AP + 0.5*APr`` (a leading ``-`` negates a term).
        known: metric names the datasets report; None skips that check.

    Returns:
        ``(weight, name)`` per term, as ``settings.parse_objective`` reads a valid expression.

    Raises:
        SearchInputError: a dangling or doubled operator, a missing ``*``, a number without a
            metric, a metric named twice, a zero or non-finite weight, or an unknown metric.
    """
    if not text or not text.strip():
        raise SearchInputError(f"--metric is empty: {_EXAMPLES}")

    def fail(reason: str) -> SearchInputError:
        return SearchInputError(f"--metric {text!r}: {reason}; {_EXAMPLES}")

    tokens = _tokens(text)
    terms: list[tuple[float, str]] = []
    index = 0
    while index < len(tokens):
        sign = 1.0
        kind, value, column = tokens[index]
        if kind == "sign":  # a leading sign, or the one between two terms
            sign = -1.0 if value == "-" else 1.0
            index += 1
        elif terms:
            raise fail(f"expected + or - before {value!r} at column {column + 1}")
        if index >= len(tokens):
            raise fail("ends with an operator, a term is missing after it")
        weight, index = _read_term(tokens, index, fail)
        terms.append((sign * weight, tokens[index - 1][1]))
    names = [name for _, name in terms]
    doubled = sorted({name for name in names if names.count(name) > 1})
    if doubled:
        raise fail(f"names {doubled} more than once (give one term with the summed weight)")
    if known is not None:
        known = list(known)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise fail(f"unknown metric(s) {unknown} (reported: {', '.join(known)})")
    return tuple(terms)


def strict_objective(text: str, known: Iterable[str] | None = None) -> Objective:
    """The :class:`~eqlv2.search.settings.Objective` of ``--metric`` read by :func:`parse_metric_strict`.

    Raises:
        SearchInputError: as :func:`parse_metric_strict`.
    """
    return Objective(terms=parse_metric_strict(text, known), text=text.replace(" ", ""))


def _read_term(
    tokens: list[tuple[str, str, int]], index: int, fail: Callable[[str], SearchInputError]
) -> tuple[float, int]:
    """Reads ``[number '*'] NAME`` from ``tokens[index]``; returns the weight and the next index."""
    kind, value, column = tokens[index]
    weight = 1.0
    if kind == "number":
        weight = float(value)
        if not math.isfinite(weight) or weight == 0.0:
            raise fail(f"weight {value} at column {column + 1} must be finite and non-zero")
        if index + 1 >= len(tokens) or tokens[index + 1][0] != "times":
            raise fail(f"number {value} at column {column + 1} must be followed by *METRIC")
        index += 2
        if index >= len(tokens):
            raise fail("ends with *, a metric name is missing")
        kind, value, column = tokens[index]
    if kind != "name":
        raise fail(f"expected a metric name at column {column + 1}, found {value!r}")
    return weight, index + 1


# --- search space -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Domain:
    """The values an EQL v2 hyper-parameter accepts."""

    rule: str
    accepts: Callable[[float], bool]


#: Valid values of each EQL v2 hyper-parameter (paper, eq. 6-8): the slope ``gamma`` of the
#: mapping function must be positive, the positive up-weighting ``alpha`` non-negative, the centre
#: ``mu`` finite.
PARAMETER_DOMAINS: dict[str, _Domain] = {
    "gamma": _Domain("gamma > 0", lambda v: math.isfinite(v) and v > 0),
    "alpha": _Domain("alpha >= 0", lambda v: math.isfinite(v) and v >= 0),
    "mu": _Domain("mu finite", math.isfinite),
}


def _domain_of(name: str) -> _Domain | None:
    """The domain of a short name or of its config key (``MODEL.EQLV2.GAMMA``)."""
    for short, key in CONFIG_KEYS.items():
        if name in (short, key):
            return PARAMETER_DOMAINS.get(short)
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_value(where: str, name: str, what: str, value: Any, domain: _Domain) -> None:
    number = _number(value)
    if number is None or not domain.accepts(number):
        raise SearchInputError(
            f"{where}: {what} {name}={value!r} is invalid: EQL v2 needs {domain.rule}"
        )


def check_search_space(space: SearchSpace) -> None:
    """Checks every value ``space`` can give ``gamma``, ``mu`` or ``alpha`` against its domain.

    Covers the searched range's ``low`` and ``high`` (hence every sample and seed point),
    categorical choices and fixed values. Ranges, log scales and seed points inside their range
    are checked when the file is parsed (``space.parse_search_space``).

    Raises:
        SearchInputError: naming the file (``space.source``) and the parameter.
    """
    where = space.source or "search space"
    for name, spec in space.params.items():
        domain = _domain_of(name)
        if domain is None:
            continue
        if spec.kind == "categorical":
            for choice in spec.choices:
                _check_value(where, name, "choice", choice, domain)
            continue
        for bound, value in (("low", spec.low), ("high", spec.high)):
            if not domain.accepts(float(value)):
                raise SearchInputError(
                    f"{where}: params.{name} range [{spec.low:g}, {spec.high:g}] is invalid: its {bound} "
                    f"{value:g} breaks {domain.rule}"
                )
    for name, value in space.fixed.items():
        domain = _domain_of(name)
        if domain is not None:
            _check_value(where, name, "fixed value", value, domain)


def load_checked_search_space(path: str | os.PathLike) -> SearchSpace:
    """Reads a search-space YAML file and checks it (:func:`check_search_space`).

    Raises:
        SearchInputError: the file is missing, malformed or holds an invalid value; the message
            names the file.
    """
    try:
        space = load_search_space(path)
    except FileNotFoundError as error:
        raise SearchInputError(f"--search-space: {error}") from None
    except SearchSpaceError as error:
        message = str(error).replace("\n", " ")
        raise SearchInputError(message if str(path) in message else f"{path}: {message}") from None
    check_search_space(space)
    return space


# --- folders ----------------------------------------------------------------------------------


def _local_path(path: str | os.PathLike) -> Path | None:
    """The local folder ``path`` names, or None for a remote URI (``s3://``, ``gs://``, ...)."""
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        return None
    return Path(text).expanduser()


def prepare_writable_dir(path: str | os.PathLike, flag: str) -> Path | None:
    """Creates the folder ``path`` (and its parents) and proves it writable by writing a file.

    Args:
        path: a local folder or ``file://`` URI; remote URIs (``s3://...``) are left to their
            file system and return None.
        flag: the option that gave it (``--results-dir``), named in the error.

    Returns:
        The absolute folder, or None for a remote URI.

    Raises:
        SearchInputError: one line naming the flag and the path: a file is in the way, the
            folder cannot be created, or a file cannot be written in it.
    """
    local = _local_path(path)
    if local is None:
        return None
    folder = local.resolve()
    for part in (folder, *folder.parents):
        if part.exists() and not part.is_dir():
            what = "is a file" if part == folder else f"cannot be created: {part} is a file"
            raise SearchInputError(f"{flag} {folder} {what}; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".eqlv2-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise SearchInputError(
            f"{flag} {folder} is not writable ({reason}); give a folder you can write to"
        ) from None
    return folder
