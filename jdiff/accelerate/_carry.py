"""Carried state for accelerations: a cache in the sampler's ``lax.scan`` carry.

A training-free acceleration (feature caching, forecasting, early exit) changes how one
network call is computed from what earlier calls left behind. In jdiff that memory is a
value: :class:`Accelerated` wraps any solver of the registry, keeps the method's cache in
the solver state (``state.aux = (solver tables, caches)``) and, inside each step, hands
the solver a denoiser whose network calls read and update that cache. ``jit``, ``vmap``,
``grad`` and the gradient strategies see one more array in the carry, nothing else.

A method is a frozen dataclass (hashable settings) with

- ``init(net, params, x, t, cond) -> cache``: the cache's structure for a network call on
  ``x`` (a pytree of arrays; only its shapes and dtypes are used: the cache starts as
  zeros, so a method keeps a counter in it to know its first call);
- ``call(net, params, x, t, cond, cache) -> (out, cache)``: the network output for this
  call and the next cache. ``net`` is the model's :class:`~jdiff.models.Internals`,
  ``t`` the network's own time input (after the denoiser's ``time_input``).
- ``neutral``: True at the setting that does nothing (then ``call`` is the plain call,
  so sampling equals the plain sampler bit for bit).

Which calls share a cache: every network that is a jdiff U-Net or DiT inside the denoiser
(a plain :class:`~jdiff.Denoiser`, or the denoisers inside guidance wrappers) gets its
own; a wrapper that calls one network twice per evaluation (unbatched classifier-free
guidance) gets one cache per call site, so the conditional and unconditional calls never
mix. A call made inside the solver's or a wrapper's control flow (``lax.cond`` /
``lax.switch``: Heun's corrector, iPNDM's first step, singlestep DPM-Solver's stages) cannot
write a carried value back out of its branch: it is a plain network call and leaves the
cache as it was (so those solvers are accelerated only in their other calls). A guidance
interval, which makes every call inside a ``lax.cond``, is refused: nothing would be
accelerated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core.tracers import current_trace

from jdiff._param import Denoiser
from jdiff._sample import sample as _sample
from jdiff.models import Apply, internals
from jdiff.solvers._base import Solver

__all__ = ["Method", "Accelerated", "accelerate", "sample", "model_leaves"]


class Method:
    """Base class of the carried accelerations (see the module docstring)."""

    name = "method"

    @property
    def neutral(self) -> bool:
        return False

    def init(self, net, params, x, t, cond):
        raise NotImplementedError

    def call(self, net, params, x, t, cond, cache):
        raise NotImplementedError

    def stats(self, cache) -> dict:
        """What the method reports from its final cache (e.g. full and cached calls);
        default: nothing."""
        return {}


def _is_denoiser(node) -> bool:
    return isinstance(node, Denoiser)


def model_leaves(denoiser) -> list:
    """The :class:`~jdiff.Denoiser` values inside ``denoiser`` (itself, or those a
    wrapper holds), in pytree order."""
    return [d for d in jax.tree.leaves(denoiser, is_leaf=_is_denoiser) if _is_denoiser(d)]


def _accelerable(d: Denoiser) -> bool:
    return isinstance(d.apply_fn, Apply) and d.params is not None


def _check_no_branching(denoiser):
    """Refuse wrappers that pick between network calls with ``lax.cond``."""
    node = denoiser
    while node is not None and not _is_denoiser(node):
        if getattr(node, "interval", None) is not None:
            raise ValueError(
                "an acceleration cannot carry its cache through a guidance interval (the wrapper chooses "
                "between calls with lax.cond); use guidance without interval="
            )
        node = getattr(node, "inner", None)


@dataclasses.dataclass(eq=False)
class _Box:
    """The cache of one network while one step is traced (a trace-time cell)."""

    caches: tuple  # one per call site
    trace: Any  # the trace of the step: calls made inside its control flow are plain
    calls: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class _CachedApply:
    """A network call that reads and writes its box (used only inside one step's trace)."""

    method: Any
    net: Any
    box: _Box

    def __call__(self, params, x, t, cond=None):
        box = self.box
        if current_trace() != box.trace:
            return self.net(params, x, t, cond)
        slot = box.calls % len(box.caches)
        out, new = self.method.call(self.net, params, x, t, cond, box.caches[slot])
        box.caches = box.caches[:slot] + (new,) + box.caches[slot + 1 :]
        box.calls += 1
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class _Record:
    """A network call that records its cache structure (used under ``jax.eval_shape``)."""

    method: Any
    net: Any
    out: list
    trace: Any

    def __call__(self, params, x, t, cond=None):
        if current_trace() != self.trace:
            return self.net(params, x, t, cond)
        leaves, treedef = jax.tree.flatten(self.method.init(self.net, params, x, t, cond))
        self.out.append(_Frozen(treedef, tuple((tuple(a.shape), np.dtype(a.dtype).name) for a in leaves)))
        return self.net(params, x, t, cond)


def _swap(denoiser, make):
    """``denoiser`` with each accelerable model leaf ``d`` replaced by ``make(i, d)``."""
    count = [0]

    def f(node):
        if _is_denoiser(node) and _accelerable(node):
            i = count[0]
            count[0] += 1
            return make(i, node)
        return node

    return jax.tree.map(f, denoiser, is_leaf=_is_denoiser)


@dataclasses.dataclass(frozen=True)
class _Frozen:
    """A cache's structure in hashable form: its treedef and leaves' ``(shape, dtype)``."""

    treedef: Any
    leaves: tuple

    def zeros(self):
        return jax.tree.unflatten(self.treedef, [jnp.zeros(shape, dtype) for shape, dtype in self.leaves])


@dataclasses.dataclass(frozen=True)
class Accelerated(Solver):
    """``inner`` with ``method``'s cache carried through the steps (build it with
    :func:`accelerate`, which also works out the cache's structure).

    Attributes:
      inner: the solver (any registry solver that is not a pytree with array fields).
      method: the acceleration (a :class:`Method`).
      template: per accelerated network, per call site, the cache's structure (static).
      report: :meth:`finish` returns ``(x, stats)`` with the method's statistics (e.g.
        full network calls made) instead of ``x``.
    """

    inner: Solver
    method: Any
    template: tuple
    report: bool = False

    # the inner solver's protocol attributes
    order = property(lambda self: self.inner.order)
    stochastic = property(lambda self: self.inner.stochastic)
    min_steps = property(lambda self: self.inner.min_steps)
    init_uses_nfe = property(lambda self: self.inner.init_uses_nfe)
    direction = property(lambda self: self.inner.direction)
    shaped_tables = property(lambda self: self.inner.shaped_tables)
    supports_adjoint = False
    padded_tables = False

    @property
    def name(self) -> str:
        return f"{self.inner.name}+{self.method.name}"

    def nfe(self, num_steps, to_data=False, from_noise=False):
        return self.inner.nfe(num_steps, to_data, from_noise)

    def num_steps(self, nfe, to_data=False, from_noise=False):
        return self.inner.num_steps(nfe, to_data, from_noise)

    def check_inputs(self, process, grid, x_T):
        self.inner.check_inputs(process, grid, x_T)

    def _check_nfe(self, process, grid, nfe):
        self.inner._check_nfe(process, grid, nfe)

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        state = self.inner.init(x_T, grid, process, key=key, nfe=nfe)
        caches = tuple(None if t is None else tuple(s.zeros() for s in t) for t in self.template)
        return state._replace(aux=(state.aux, caches))

    def step(self, denoiser, state, cond=None):
        aux, caches = state.aux
        boxes, trace = [], current_trace()

        def make(i, d):
            box = _Box(caches[i], trace)
            boxes.append(box)
            return d.replace(apply_fn=_CachedApply(self.method, internals(d.apply_fn, d.params), box))

        den = _swap(denoiser, make)
        new = self.inner.step(den, state._replace(aux=aux), cond)
        return new._replace(aux=(new.aux, tuple(b.caches for b in boxes)))

    def finish(self, state, dtype):
        x = self.inner.finish(state._replace(aux=state.aux[0]), dtype)
        if not self.report:
            return x
        stats = [
            [self.method.stats(c) for c in per_site] if per_site is not None else None for per_site in state.aux[1]
        ]
        return x, stats


def accelerate(solver: Solver, method, denoiser, x_T, cond=None, *, report: bool = False) -> Solver:
    """``solver`` with ``method``'s cache carried through sampling ``denoiser`` from ``x_T``.

    Args:
      solver: any jdiff solver (deterministic or stochastic) that is not a pytree with
        array fields (the inversions that start from more than ``x_T``).
      method: an acceleration (a :class:`Method`, e.g. ``jdiff.accelerate.deep_cache()``).
      denoiser: the denoiser that will be sampled: a :class:`~jdiff.Denoiser` of a jdiff
        U-Net or DiT (built by :func:`jdiff.models.to_denoiser` or loaded by
        :func:`jdiff.presets.pretrained`), or a guidance wrapper around such denoisers.
      x_T, cond: the starting noise and conditioning (their shapes fix the cache's).
      report: the solver's result becomes ``(x, stats)`` (see :class:`Accelerated`).

    Returns:
      A solver for :func:`jdiff.sample` with the same denoiser, ``x_T`` and ``cond``; the
      solver itself when ``method`` is neutral (its ``neutral`` setting does nothing), so
      sampling then is the plain sampler.

    Raises:
      TypeError: a method that is not a :class:`Method`, a denoiser without a jdiff model.
      ValueError: a solver with array fields, a wrapper that calls its networks under
        ``lax.cond`` (a guidance interval).
    """
    if not isinstance(method, Method):
        raise TypeError(f"method must be a jdiff.accelerate method, got {type(method).__name__}")
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jdiff Solver, got {type(solver).__name__}")
    if jax.tree.leaves(solver) != [solver]:
        raise ValueError(f"{solver.name} carries arrays of its own; an acceleration wraps the sampling solvers only")
    leaves = model_leaves(denoiser)
    if not any(_accelerable(d) for d in leaves):
        raise TypeError(
            "the denoiser holds no jdiff U-Net or DiT with parameters (jdiff.models.to_denoiser or "
            "jdiff.presets.pretrained build one): there are no internals to cache"
        )
    _check_no_branching(denoiser)
    if method.neutral and not report:
        return solver
    records = []

    def record(x, c):
        trace = current_trace()

        def make(i, d):
            records.append([])
            return d.replace(apply_fn=_Record(method, internals(d.apply_fn, d.params), records[-1], trace))

        return _swap(denoiser, make)(x, jnp.asarray(denoiser.process.t_max, x.dtype), c)

    jax.eval_shape(record, jnp.asarray(x_T), cond)
    template = tuple(tuple(rec) for rec in records)
    return Accelerated(solver, method, template, report)


def sample(method, solver, denoiser, x_T, grid=None, *, cond=None, report: bool = False, **kwargs):
    """:func:`jdiff.sample` with ``method`` carried through the steps (see :func:`accelerate`).

    Args:
      method, solver, denoiser, x_T, grid, cond: as for :func:`accelerate` and
        :func:`jdiff.sample`.
      report: also return the method's statistics: ``(x, stats)`` (or
        ``(x, info, stats)`` with ``return_info=True``).
      **kwargs: the other keywords of :func:`jdiff.sample` (``nfe``, ``key``,
        ``return_info``, ``gradient``, ...).
    """
    acc = accelerate(solver, method, denoiser, x_T, cond, report=report)
    out = _sample(acc, denoiser, x_T, grid, cond=cond, **kwargs)
    if not report:
        return out
    if kwargs.get("return_info"):
        (x, stats), info = out
        return x, info, stats
    return out
