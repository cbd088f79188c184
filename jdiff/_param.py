"""Model parameterizations and the denoiser boundary.

A network may predict any of

- ``"eps"``   the noise ``eps``;
- ``"x0"``    the clean data ``x_0``;
- ``"v"``     ``v = alpha * eps - sigma * x_0`` (Salimans & Ho, "Progressive
  Distillation for Fast Sampling of Diffusion Models", ICLR 2022);
- ``"score"`` ``grad_x log p_t(x) = -eps / sigma``;
- ``"flow"``  the probability-flow velocity ``dx/dt = alpha'(t) x_0 + sigma'(t) eps``,
  which is the flow-matching target (``eps - x_0`` for rectified flow).

Because ``x = alpha x_0 + sigma eps``, each one together with ``x`` fixes the pair
``(x_0, eps)``. :func:`to_x0_eps` converts once, at the boundary, and solvers work only
with that pair (:class:`Prediction`). :func:`from_x0_eps` gives training targets.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._process import Process

__all__ = [
    "PREDICTIONS",
    "TIME_INPUTS",
    "Prediction",
    "check_prediction",
    "model_time",
    "Denoiser",
    "denoiser",
    "to_x0_eps",
    "from_x0_eps",
    "convert",
    "broadcast_to_x",
    "same_function",
    "check_cond_batch",
    "TreeValue",
]

PREDICTIONS = ("eps", "x0", "v", "score", "flow")
TIME_INPUTS = ("t", "timestep", "sigma", "rho", "log_rho")


class Prediction(NamedTuple):
    """A model output converted to the consistent pair ``x = alpha x0 + sigma eps``."""

    x0: jax.Array
    eps: jax.Array


def model_time(process: Process, time_input, t):
    """What a network takes as time: ``time_input`` is ``"t"`` (the process time),
    ``"timestep"`` (the discrete step index ``N t - 1`` of a :class:`~jdiff.VPDiscrete`
    process), ``"sigma"``, ``"rho"`` (``sigma / alpha``), ``"log_rho"``
    (``-lambda``; EDM's ``c_noise`` up to the factor 1/4) or a callable ``t -> t_in``."""
    if callable(time_input):
        return time_input(t)
    if time_input == "t":
        return t
    if time_input == "timestep":
        return process.timestep(t)
    if time_input == "sigma":
        return process.sigma(t)
    if time_input == "rho":
        return process.rho(t)
    if time_input == "log_rho":
        return -process.lambda_(t)
    raise ValueError(f"unknown time_input {time_input!r}; expected one of {TIME_INPUTS} or a callable")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown parameterization {prediction!r}; expected one of {PREDICTIONS}")
    return prediction


def broadcast_to_x(c, x):
    """Reshape a per-sample scalar ``c`` (shape ``()`` or ``(B,)``) to broadcast against
    ``x`` of shape ``(B, ...)``."""
    c = jnp.asarray(c)
    if c.ndim == 0:
        return c
    if c.ndim == 1 and x.ndim >= 1 and c.shape[0] == x.shape[0]:
        return c.reshape(c.shape + (1,) * (x.ndim - 1))
    if c.shape == x.shape:
        return c
    raise ValueError(f"time of shape {c.shape} does not match data of shape {x.shape}: expected () or ({x.shape[0]},)")


def _coefs(process: Process, t, x, need_derivs=False):
    t = jnp.asarray(t, dtype=jnp.result_type(x.dtype, jnp.float32))
    a = broadcast_to_x(process.alpha(t), x)
    s = broadcast_to_x(process.sigma(t), x)
    if not need_derivs:
        return a, s
    da = broadcast_to_x(process.d_alpha(t), x)
    ds = broadcast_to_x(process.d_sigma(t), x)
    return a, s, da, ds


def to_x0_eps(prediction: str, out, x, t, process: Process) -> Prediction:
    """Convert a model output of kind ``prediction`` at ``(x, t)`` to ``(x0, eps)``.

    ``t`` is a scalar or has shape ``(B,)``. Formulas are the exact inverses of
    ``x = alpha x0 + sigma eps`` together with the parameterization's definition.
    """
    check_prediction(prediction)
    if prediction == "eps":
        a, s = _coefs(process, t, x)
        return Prediction((x - s * out) / a, out)
    if prediction == "x0":
        a, s = _coefs(process, t, x)
        return Prediction(out, (x - a * out) / s)
    if prediction == "v":
        a, s = _coefs(process, t, x)
        n2 = a * a + s * s
        return Prediction((a * x - s * out) / n2, (s * x + a * out) / n2)
    if prediction == "score":
        a, s = _coefs(process, t, x)
        eps = -s * out
        return Prediction((x - s * eps) / a, eps)
    # flow velocity u = a' x0 + s' eps ; x = a x0 + s eps
    a, s, da, ds = _coefs(process, t, x, need_derivs=True)
    det = a * ds - s * da
    return Prediction((ds * x - s * out) / det, (a * out - da * x) / det)


def from_x0_eps(prediction: str, x0, eps, t, process: Process, x=None):
    """The target of kind ``prediction`` for data ``x0`` and noise ``eps`` at time ``t``
    (the inverse of :func:`to_x0_eps`)."""
    check_prediction(prediction)
    ref = x0
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        a, s = _coefs(process, t, ref)
        return a * eps - s * x0
    if prediction == "score":
        _, s = _coefs(process, t, ref)
        return -eps / s
    a, s, da, ds = _coefs(process, t, ref, need_derivs=True)
    return da * x0 + ds * eps


def convert(out, x, t, process: Process, from_: str, to: str):
    """Convert a model output between any two parameterizations."""
    p = to_x0_eps(from_, out, x, t, process)
    return from_x0_eps(to, p.x0, p.eps, t, process, x=x)


def same_function(f, g) -> bool:
    """Whether ``f`` and ``g`` compute the same thing for sure: the same object, or two
    functions made by the same definition (equal ``__code__``, the same globals, the
    same defaults and closure cell contents by identity), e.g. two lambdas written on
    one line and evaluated twice; ``functools.partial`` objects of such functions with
    the same arguments (by identity); else ``f == g`` for callables that define it."""
    if f is g:
        return True
    if isinstance(f, types.FunctionType) and isinstance(g, types.FunctionType):
        if f.__code__ != g.__code__ or f.__globals__ is not g.__globals__:
            return False
        if not _same_items(f.__defaults__ or (), g.__defaults__ or ()):
            return False
        kf, kg = f.__kwdefaults__ or {}, g.__kwdefaults__ or {}
        if kf.keys() != kg.keys() or not _same_items([kf[k] for k in kf], [kg[k] for k in kf]):
            return False
        return _same_items([_cell(c) for c in f.__closure__ or ()], [_cell(c) for c in g.__closure__ or ()])
    if isinstance(f, functools.partial) and isinstance(g, functools.partial):
        return (
            same_function(f.func, g.func)
            and _same_items(f.args, g.args)
            and f.keywords.keys() == g.keywords.keys()
            and _same_items([f.keywords[k] for k in f.keywords], [g.keywords[k] for k in f.keywords])
        )
    if type(f) is not type(g):
        return False
    try:
        return bool(f == g)
    except Exception:  # noqa: BLE001 - an __eq__ that does not give a truth value
        return False


_EMPTY = object()


def _cell(c):
    try:
        return c.cell_contents
    except ValueError:  # an empty cell
        return _EMPTY


def _same_items(a, b) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def check_cond_batch(cond, batch: int, what: str = "x_T", shape=None):
    """Raise ``ValueError`` unless every array leaf of ``cond`` with ``ndim >= 1`` has
    leading axis ``batch`` (per-sample conditioning); the message names the leaf, its
    shape and ``what`` (the argument whose batch it must match, of shape ``shape``)."""
    if cond is None:
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(cond):
        sh = getattr(leaf, "shape", None)
        if sh is None or len(sh) == 0 or sh[0] == batch:
            continue
        where = "cond" + jax.tree_util.keystr(path)
        of = f" of shape {tuple(shape)}" if shape is not None else ""
        raise ValueError(
            f"{where} has shape {tuple(sh)}, but its leading axis must be the batch {batch} of {what}{of}: "
            "every array in cond with ndim >= 1 is per sample"
        )


class _FnKey:
    """A callable as static pytree metadata, equal by :func:`same_function`: two fresh
    lambdas from one definition give the same compiled program."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __eq__(self, other):
        return isinstance(other, _FnKey) and same_function(self.fn, other.fn)

    def __hash__(self):
        fn = self.fn.func if isinstance(self.fn, functools.partial) else self.fn
        code = getattr(fn, "__code__", None)
        if code is not None:
            return hash(code)
        try:
            return hash(fn)
        except TypeError:
            return hash(type(fn))

    def __repr__(self):
        return repr(self.fn)


def _static(v):
    return _FnKey(v) if callable(v) else v


def _unstatic(v):
    return v.fn if isinstance(v, _FnKey) else v


class TreeValue:
    """Equality and hashing for a frozen dataclass that is a pytree: equal when the tree
    structures are equal (static settings, functions by :func:`same_function`) and the
    leaves are the same objects or equal concrete arrays; the hash covers only the
    structure, so array leaves (a guidance scale, parameters) may be traced."""

    def __eq__(self, other):
        if type(self) is not type(other):
            return NotImplemented
        la, ta = jax.tree.flatten(self)
        lb, tb = jax.tree.flatten(other)
        return ta == tb and all(_same_leaf(a, b) for a, b in zip(la, lb))

    def __hash__(self):
        return hash(jax.tree.structure(self))


def _same_leaf(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        return False
    try:
        a, b = np.asarray(a), np.asarray(b)
    except Exception:  # noqa: BLE001
        return False
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=True))


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser(TreeValue):
    """A model seen from the samplers: ``denoiser(x, t, cond) -> Prediction(x0, eps)``.

    Attributes:
      apply_fn: the network. Called as ``apply_fn(params, x, t_in, cond)`` when
        ``params`` is not None, else ``apply_fn(x, t_in, cond)``. ``t_in`` has shape
        ``(B,)``.
      params: a pytree of parameters (or None). Kept explicit so that samplers can
        differentiate with respect to it.
      process: the :class:`~jdiff.Process` the model was trained for.
      prediction: what the network predicts; one of :data:`PREDICTIONS`.
      time_input: what the network takes as time: ``"t"`` (the process time),
        ``"timestep"`` (the discrete step index ``N t - 1`` of a
        :class:`~jdiff.VPDiscrete` process), ``"sigma"``, ``"rho"`` (``sigma/alpha``),
        ``"log_rho"``, or a callable ``t -> t_in``.

    The object is a pytree whose leaves are ``params`` and the process's tables.
    """

    apply_fn: Callable
    params: Any = None
    process: Process = None
    prediction: str = "eps"
    time_input: Any = "t"

    def __post_init__(self):
        check_prediction(self.prediction)
        if not isinstance(self.process, Process):
            raise TypeError(f"process must be a jdiff Process, got {type(self.process).__name__}")
        if not callable(self.time_input) and self.time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time_input {self.time_input!r}; expected one of {TIME_INPUTS} or a callable")
        if self.time_input == "timestep" and not self.process.discrete:
            raise ValueError("time_input='timestep' needs a discrete process (jdiff.vp_discrete)")

    def model_time(self, t):
        return model_time(self.process, self.time_input, t)

    def raw(self, x, t, cond=None):
        """The network's own output at ``(x, t)``; ``t`` scalar or ``(B,)``."""
        t = jnp.asarray(t)
        tb = jnp.broadcast_to(t, (x.shape[0],)) if t.ndim == 0 else t
        t_in = self.model_time(tb)
        if self.params is None:
            out = self.apply_fn(x, t_in, cond)
        else:
            out = self.apply_fn(self.params, x, t_in, cond)
        if getattr(out, "shape", None) != x.shape:
            raise ValueError(
                f"the model returned shape {getattr(out, 'shape', type(out))} for input of shape {x.shape}; "
                "a denoiser must return an array of the input's shape"
            )
        return out

    def __call__(self, x, t, cond=None) -> Prediction:
        out = self.raw(x, t, cond)
        dt = jnp.result_type(x.dtype, jnp.float32)
        return to_x0_eps(self.prediction, out.astype(dt), x.astype(dt), t, self.process)

    def replace(self, **kw) -> Denoiser:
        return dataclasses.replace(self, **kw)


def _flatten_with_keys(d: Denoiser):
    children = ((jax.tree_util.GetAttrKey("params"), d.params), (jax.tree_util.GetAttrKey("process"), d.process))
    return children, (_static(d.apply_fn), d.prediction, _static(d.time_input))


def _flatten(d: Denoiser):
    return (d.params, d.process), (_static(d.apply_fn), d.prediction, _static(d.time_input))


def _unflatten(aux, children) -> Denoiser:
    d = object.__new__(Denoiser)
    for name, v in zip(("apply_fn", "prediction", "time_input"), aux):
        object.__setattr__(d, name, _unstatic(v))
    object.__setattr__(d, "params", children[0])
    object.__setattr__(d, "process", children[1])
    return d


# apply_fn and a callable time_input are static metadata compared by same_function, so
# two denoisers built from fresh lambdas of one definition share a compiled program
jax.tree_util.register_pytree_with_keys(Denoiser, _flatten_with_keys, _unflatten, _flatten)


def denoiser(apply_fn: Callable, process: Process, prediction: str = "eps", *, params=None, time_input="t") -> Denoiser:
    """Wrap a network for the samplers. See :class:`Denoiser`.

    Example::

        den = jdiff.denoiser(lambda x, t, c: net(x, t), jdiff.vp_linear(), "eps")
        x0 = jdiff.sample(jdiff.solvers.dpm_solver_pp(2), den, x_T, grid)
    """
    return Denoiser(apply_fn=apply_fn, params=params, process=process, prediction=prediction, time_input=time_input)
