"""Bounded caches of the tuners' compiled programs.

Each fit (LD3's Adam loop through the sampler, GITS's cost table, DMN's bound) is one
module-level ``jax.jit`` with its settings static, so fits that share the solver, the NFE,
the settings and the shapes share one compiled program. A sweep over many solvers and
NFEs still compiles one program per configuration, and XLA's CPU backend keeps every
compiled program mapped (measured: about 500 memory mappings per LD3 program; Linux
allows 65,530 per process by default). :class:`Bounded` keeps at most ``limit`` programs
per fit function: a new configuration beyond it clears that function's cache first, so
a long sweep stays bounded (``benchmarks/tune_programs.py`` measures it).
"""

from __future__ import annotations

import jax
import numpy as np

MAX_PROGRAMS = 8


def _signature(args, static) -> tuple:
    """What selects a compiled program: the pytree structure of the arguments, the shape
    and dtype of each leaf, and the static settings."""
    leaves, tree = jax.tree.flatten(args)
    shapes = tuple((np.shape(a), str(a.dtype)) if hasattr(a, "dtype") else _hashable(a) for a in leaves)
    return tree, shapes, tuple(sorted(static.items()))


def _hashable(a):
    try:
        hash(a)
    except TypeError:
        return type(a).__name__
    return a


class Bounded:
    """``fn`` (a ``jax.jit`` function) called with array arguments and static keywords,
    keeping at most ``limit`` compiled programs: a call with a new signature beyond the
    limit first clears ``fn``'s cache (``clear_cache``), dropping the older programs.

    Attributes:
      fn: the jitted function.
      limit: the most programs kept.
      cleared: how many times the cache was cleared.
    """

    def __init__(self, fn, limit: int = MAX_PROGRAMS):
        self.fn, self.limit, self.cleared = fn, int(limit), 0
        self._seen: set = set()

    def __call__(self, *args, **static):
        key = _signature(args, static)
        if key not in self._seen:
            if len(self._seen) >= self.limit:
                self.fn.clear_cache()
                self._seen.clear()
                self.cleared += 1
            self._seen.add(key)
        return self.fn(*args, **static)

    def cache_size(self) -> int:
        """The number of programs the jitted function holds now."""
        return self.fn._cache_size()

    def clear_cache(self) -> None:
        self.fn.clear_cache()
        self._seen.clear()
