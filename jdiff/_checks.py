"""Value checks that hold eagerly and under ``jit``.

A check on a value (a monotone grid, times in range, finite input, labels in range)
must not silently pass when the value is traced. :func:`error_if` raises
``ValueError`` at once when the condition is known now, and otherwise attaches a
runtime check with :func:`equinox.error_if` (equinox comes with diffrax): the
compiled program then fails with the same message when the condition holds. The check
is one reduction per call, outside any solver step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["concrete", "is_concrete", "error_if", "batch_array"]


def concrete(a):
    """``a`` as a NumPy array if its value is known now (not traced), else ``None``."""
    if isinstance(a, jax.core.Tracer):
        return None
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return None


def is_concrete(tree) -> bool:
    """Whether every array leaf of ``tree`` has a value known now."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def error_if(x, bad, msg: str, exc: type[Exception] = ValueError):
    """Return ``x``; fail with ``msg`` when the boolean ``bad`` (any shape) holds.

    When ``bad`` is concrete the error is raised now as ``exc``. When it is traced,
    ``x`` comes back carrying a runtime check (``equinox.error_if``): computing it raises
    an error whose message contains ``msg``. Use the returned ``x`` downstream, or the
    check may be pruned from the compiled program.
    """
    b = concrete(bad)
    if b is not None:
        if np.any(b):
            raise exc(msg)
        return x
    import equinox as eqx

    return eqx.error_if(x, bad, msg)


def batch_array(x, name: str = "x_T", *, min_ndim: int = 1, prefix: str = ""):
    """``x`` as a floating-point JAX array with a leading batch axis (at least ``min_ndim``
    axes); raises ``TypeError``/``ValueError`` naming ``name`` otherwise. ``prefix`` (e.g.
    ``"invert: "``) starts the message."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{prefix}{name} must be floating point, got {x.dtype}")
    if x.ndim < min_ndim:
        eg = "(B, d)" if min_ndim <= 2 else "(B, ...)"
        what = "a leading batch axis" if min_ndim == 1 else "a leading batch axis and features"
        raise ValueError(f"{prefix}{name} must have {what}, e.g. shape {eg}; got shape {x.shape}")
    return x
