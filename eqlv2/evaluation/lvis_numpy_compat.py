"""The one place that lets ``lvis==0.5.3``'s evaluation code run on numpy >= 1.24.

``lvis.eval.LVISEval.accumulate`` calls ``np.float``, an alias of the builtin ``float`` that numpy
deprecated in 1.20 and removed in 1.24; on the numpy 2 of this project it raises
``AttributeError: module 'numpy' has no attribute 'float'``. Rather than putting the alias back on
numpy for the whole process, :func:`lvis_numpy_compat` swaps the ``np`` name *inside the module
``lvis.eval`` only*, for the duration of a ``with`` block, for a proxy that forwards every attribute
to numpy and answers ``float`` with the builtin.

``tests/test_lvis_numpy_compat.py`` checks that the workaround is still needed: when an ``lvis``
release stops using ``np.float`` that test fails, and this module and its uses can be deleted.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator

import numpy

__all__ = ["lvis_needs_numpy_compat", "lvis_numpy_compat"]

# Names of numpy aliases removed in 1.24 that lvis 0.5.3 uses, and what they stood for.
_REMOVED_ALIASES = {"float": float}

_lock = threading.RLock()


class _NumpyWithRemovedAliases(types.ModuleType):
    """A stand-in for the ``numpy`` module that also has numpy's removed scalar aliases."""

    def __init__(self) -> None:
        super().__init__("numpy", doc=numpy.__doc__)

    def __getattr__(self, name: str):
        if name in _REMOVED_ALIASES:
            return _REMOVED_ALIASES[name]
        return getattr(numpy, name)


def lvis_needs_numpy_compat() -> bool:
    """Whether the installed numpy lacks an alias that ``lvis.eval`` uses."""
    return any(not hasattr(numpy, name) for name in _REMOVED_ALIASES)


@contextlib.contextmanager
def lvis_numpy_compat() -> Iterator[None]:
    """Within the block, ``lvis.eval`` sees a numpy that still has ``np.float``.

    Only the module global ``np`` of ``lvis.eval`` changes, and it is restored on exit (also on
    error); numpy itself and every other module are untouched. A no-op when numpy still has the
    aliases. Re-entrant; concurrent blocks in several threads are serialised by a lock.
    """
    if not lvis_needs_numpy_compat():
        yield
        return
    import lvis.eval as lvis_eval

    with _lock:
        previous = lvis_eval.np
        lvis_eval.np = _NumpyWithRemovedAliases()
        try:
            yield
        finally:
            lvis_eval.np = previous
