"""A pure functional view of an NNX model, and the bridge to :class:`jdiff.Denoiser`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from jdiff._param import Denoiser
from jdiff._process import Process

__all__ = ["Apply", "functional", "to_denoiser", "count_params", "abstract_model"]


@dataclasses.dataclass(frozen=True, eq=False)
class Apply:
    """``apply(params, x, t, cond=None, key=None)``: run the model whose structure is
    ``graphdef`` with the variables ``params`` (a pure function; ``nnx.merge`` inside).

    ``key=None`` is eval mode (no dropout); a PRNG key is train mode. Two ``Apply``
    objects built from models of the same structure compare (and hash) equal, so a
    :class:`jdiff.Denoiser` holding one is not recompiled when rebuilt.
    """

    graphdef: Any

    def __call__(self, params, x, t, cond=None, key=None):
        model = nnx.merge(self.graphdef, params, copy=True)
        return model(x, t, cond, rngs=key)

    def __eq__(self, other):
        return isinstance(other, Apply) and self.graphdef == other.graphdef

    def __hash__(self):
        return hash((Apply, self.graphdef))


def functional(model: nnx.Module):
    """Split ``model`` into a pure function and its variables.

    Returns:
      ``(apply, params)``: ``params`` is the model's whole ``nnx.State`` (for the jdiff
      models that is exactly their :class:`~flax.nnx.Param` variables: they keep no
      other state), a pytree that ``jax.grad``, ``optax`` and ``orbax`` accept;
      ``apply(params, x, t, cond=None, key=None)`` is pure and works under ``jax.jit``,
      ``jax.grad`` (w.r.t. ``params``, ``x`` or ``t``) and ``jax.vmap``.

    Example::

        apply, params = jdiff.models.functional(model)
        loss = lambda p: jnp.mean((apply(p, x_t, t, y, key) - eps) ** 2)
        grads = jax.grad(loss)(params)
        nnx.update(model, new_params)       # write trained values back if wanted
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"functional() takes an nnx.Module, got {type(model).__name__}")
    graphdef, params = nnx.split(model)
    return Apply(graphdef), params


def to_denoiser(
    model: nnx.Module, process: Process, prediction: str = "eps", time_input: Any = "t", params=None
) -> Denoiser:
    """Wrap a model for the samplers as a :class:`jdiff.Denoiser` with explicit params.

    Args:
      model: a jdiff model (or any NNX module called as ``model(x, t, cond, rngs=None)``).
      process: the process the model is (or will be) trained for.
      prediction: what it predicts (``"eps"``, ``"x0"``, ``"v"``, ``"score"``, ``"flow"``).
      time_input: what it takes as time (see :class:`jdiff.Denoiser`); remember the
        model's own ``time_scale`` multiplies it.
      params: parameters to use instead of the model's current ones (e.g. EMA weights
        of the same structure).

    The denoiser runs in eval mode (no dropout). Its ``params`` field is a pytree leaf,
    so ``jax.grad`` through :func:`jdiff.sample` reaches the network weights.
    """
    apply, own = functional(model)
    return Denoiser(
        apply_fn=apply,
        params=own if params is None else params,
        process=process,
        prediction=prediction,
        time_input=time_input,
    )


def count_params(model_or_state) -> int:
    """Number of scalars in the :class:`~flax.nnx.Param` variables of a module (or in
    all leaves of a state/pytree)."""
    if isinstance(model_or_state, nnx.Module):
        model_or_state = nnx.state(model_or_state, nnx.Param)
    return int(sum(getattr(a, "size", 1) for a in jax.tree.leaves(model_or_state)))


def abstract_model(cls, config, seed: int = 0):
    """Build ``cls(config)`` with ``nnx.eval_shape``: shapes and dtypes only, no
    memory or compute (useful to count the parameters of a large configuration)."""
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(seed)))
