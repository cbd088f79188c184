"""Value checks that hold eagerly, under ``jit`` and on meshes.

A check on a value (a monotone grid, times in range, finite input, labels in range)
must not silently pass when the value is traced. :func:`error_if` raises
``ValueError`` at once when the condition is known now. When it is traced, the
condition is first reduced to one boolean over the whole array (under a sharded
``jit`` an all-reduce, so every device holds the same flag), and a host callback
(``jax.debug.callback(partitioned=True)``, under ``lax.cond`` on that flag) raises
:class:`CheckFailed` with the message on *every* device at the same point of the
program. No device is then left waiting in a collective for one that stopped: the
compiled program fails and the caller's thread gets a Python exception
(``jax.errors.JaxRuntimeError``) at once. ``equinox.error_if`` (used before) runs its
callback on one device and broadcasts its result, so on a mesh the other devices hung
in that broadcast until the process aborted.

The runtime error's first line is XLA's (``INTERNAL: CpuCallback error ...``), not the
check's: :func:`check_message` extracts the check's own message from it, and
:func:`reraise_checks` turns such an error into ``ValueError(message)`` where the
inputs were concrete (:func:`jdiff.sample` does this for its eager calls). The check is
one reduction per call, outside any solver step.
"""

from __future__ import annotations

import contextlib
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CheckFailed",
    "concrete",
    "is_concrete",
    "error_if",
    "check_message",
    "reraise_checks",
    "batch_array",
]


class CheckFailed(ValueError):
    """A value check that failed inside a compiled program (raised in the host
    callback; it reaches the caller inside a ``JaxRuntimeError``, see
    :func:`check_message`)."""


class _QuietChecks(logging.Filter):
    """JAX logs every exception raised in a debug callback with its traceback (once per
    device on a mesh) before re-raising it; a failed check is reported by the exception
    alone, so its log records are dropped (every other record passes)."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, CheckFailed)


logging.getLogger("jax._src.debugging").addFilter(_QuietChecks())


def concrete(a):
    """``a`` as a NumPy array if its value is known now (not traced), else ``None``."""
    if isinstance(a, jax.core.Tracer) or (isinstance(a, jax.Array) and not a.is_fully_addressable):
        return None
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return None


def is_concrete(tree) -> bool:
    """Whether every array leaf of ``tree`` has a value known now."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _raiser(msg: str):
    def fail(flag):
        if np.any(np.asarray(flag)):  # under vmap both branches run: look at the flag
            raise CheckFailed(msg)

    return fail


def error_if(x, bad, msg: str, exc: type[Exception] = ValueError):
    """Return ``x``; fail with ``msg`` when the boolean ``bad`` (any shape) holds.

    When ``bad`` is concrete the error is raised now as ``exc``. When it is traced, the
    compiled program fails when ``bad`` holds anywhere: it raises
    ``jax.errors.JaxRuntimeError`` on the calling thread, whose text contains ``msg``
    (:func:`check_message` returns it), also when the array is sharded over several
    devices (see the module docstring). The check is a side effect of the program,
    kept whether ``x`` is used or not; checks made on the returned ``x`` run after it.
    """
    b = concrete(bad)
    if b is None and not isinstance(bad, jax.core.Tracer):
        b = concrete(jnp.any(bad))  # a concrete array spread over hosts: read the reduced flag
    if b is not None:
        if np.any(b):
            raise exc(msg)
        return x
    flag = jnp.any(bad)  # one replicated scalar: every device takes the same branch
    fail = _raiser(msg)

    def failing(f, x):
        jax.debug.callback(fail, f, partitioned=True)
        # not x itself: a branch that returned its operand unchanged would be forwarded
        # by XLA, and the checks made on the returned x would no longer wait for this one
        return jax.tree.map(jnp.zeros_like, x)

    # checks made on the returned x run after this one (the first failed check is the
    # one reported, as when they run eagerly); the program never gets past a failure
    return jax.lax.cond(flag, failing, lambda f, x: x, flag, x)


_MARK = re.compile(r"(?:^|\n)(?:[\w.]*\.)?CheckFailed: ([^\n]*)")


def check_message(exc: BaseException) -> str | None:
    """The message of the value check that made a compiled program fail, or None.

    Under ``jit`` a failed check (:func:`error_if`, e.g. a NaN ``x_T`` or labels out of
    range) reaches the caller as ``jax.errors.JaxRuntimeError`` whose first line is
    XLA's ``INTERNAL: CpuCallback error ...`` followed by a traceback; this returns the
    check's own one-line message from it (also for a :class:`CheckFailed` or its
    text), and None for any other exception.

    Example::

        try:
            x = jax.jit(lambda x: jdiff.sample(solver, den, x, grid))(x_T)
        except jax.errors.JaxRuntimeError as e:
            if (msg := jdiff.check_message(e)) is None:
                raise
            print(msg)  # "x_T of shape (8, 2) has non-finite values (NaN or inf)"
    """
    if isinstance(exc, CheckFailed):
        return str(exc)
    m = _MARK.search(str(exc))
    return None if m is None else m.group(1)


@contextlib.contextmanager
def reraise_checks():
    """Inside, a ``JaxRuntimeError`` from a failed value check is raised as
    ``ValueError`` with the check's message (other errors pass unchanged). Use it around
    a compiled call on concrete inputs, blocking on its result inside the block."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        msg = check_message(e)
        if msg is None:
            raise
        raise ValueError(msg) from None


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
