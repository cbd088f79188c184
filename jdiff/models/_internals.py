"""A model's internals as values: the pure view of a U-Net or DiT cut into parts.

Training-free accelerations reuse or forecast a network's intermediate features across
sampling steps (DeepCache, Ma et al., CVPR 2024; FORA / Delta-DiT; TaylorSeer, Liu et al.
2025) or stop inside it (DeeDiff, Tang et al. 2023). In JAX those features must be values
a sampler can carry in its ``lax.scan`` state, not attributes a hook writes. A cut splits
the model's call into three pure functions of its parameters::

    h, ctx = internals.front(params, x, t, cond, cut)   # shallow input layers
    f = internals.deep(params, h, ctx, cut)             # the expensive middle
    out = internals.back(params, f, ctx, cut)           # shallow output layers

and ``back(deep(front(x)))`` *is* the model's call (the modules' ``__call__`` is written
that way), so the parts compose to the plain model bit for bit at every cut. A cache
stores ``f`` (or what predicts it) and skips ``deep``. For the U-Net, cut ``k`` puts the
input convolution and the first ``k`` encoder blocks in the front and the decoder blocks
that read their skip activations in the back (DeepCache's branch ``k``); for the DiT, the
first and last ``k`` blocks. The DiT's blocks are also reachable one by one (``embed``,
``block``, ``head``) for per-block methods such as early exit.

``ctx`` holds what the later parts need from the front (the conditioning embedding, the
U-Net's skip activations); it lives only inside one network call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from jdiff.models._dit import DiT
from jdiff.models._functional import Apply
from jdiff.models._unet import UNet

__all__ = ["Internals", "internals"]


@dataclasses.dataclass(frozen=True, eq=False)
class Internals:
    """The parts of a jdiff U-Net or DiT as pure functions of its parameters.

    Build with :func:`internals`. Every method takes the model's ``params`` first (the
    ``nnx.State`` of :func:`jdiff.models.functional`) and runs in eval mode (no dropout).

    Attributes:
      graphdef: the model's structure.
      kind: ``"unet"`` or ``"dit"``.
      num_cuts: the valid cuts are ``0..num_cuts - 1`` (see the module docstring).
      depth: the DiT's number of blocks (0 for a U-Net).
    """

    graphdef: Any
    kind: str
    num_cuts: int
    depth: int

    def _model(self, params):
        return nnx.merge(self.graphdef, params, copy=True)

    def __call__(self, params, x, t, cond=None):
        """The plain model call, ``apply(params, x, t, cond)`` in eval mode."""
        return self._model(params)(x, t, cond)

    def front(self, params, x, t, cond, cut: int):
        """``(h, ctx)``: the front's output feature and the call's context."""
        return self._model(params).front(x, t, cond, cut=cut)

    def deep(self, params, h, ctx, cut: int):
        """The deep part's output feature from the front's ``h``."""
        return self._model(params).deep(h, ctx, cut=cut)

    def back(self, params, f, ctx, cut: int):
        """The model's output from the deep feature ``f`` (computed, cached or forecast)."""
        return self._model(params).back(f, ctx, cut=cut)

    def embed(self, params, x, t, cond=None):
        """DiT only: ``(tokens, ctx)`` after the patch, position and conditioning embedding."""
        self._need_dit("embed")
        return self._model(params).embed(x, t, cond)

    def block(self, params, i: int, h, ctx):
        """DiT only: transformer block ``i`` applied to the tokens ``h``."""
        self._need_dit("block")
        return self._model(params).block(i, h, ctx)

    def head(self, params, h, ctx):
        """DiT only: the output layer (final adaLN and linear map) on tokens ``h``."""
        self._need_dit("head")
        return self._model(params).head(h, ctx)

    def _need_dit(self, what):
        if self.kind != "dit":
            raise ValueError(f"internals.{what} is defined for a DiT; this model is a {self.kind}")

    def __eq__(self, other):
        return isinstance(other, Internals) and self.graphdef == other.graphdef

    def __hash__(self):
        return hash((Internals, self.graphdef))


def internals(model, params=None) -> Internals:
    """The :class:`Internals` of a jdiff :class:`~jdiff.models.UNet` or
    :class:`~jdiff.models.DiT`.

    Args:
      model: the module itself, or the ``Apply`` of :func:`jdiff.models.functional` (a
        :class:`jdiff.Denoiser`'s ``apply_fn``) together with ``params``.
      params: the parameters, when ``model`` is an ``Apply`` (they may be traced: only
        the structure is read).

    Raises:
      TypeError: for another network (it declares no cuts), or an ``Apply`` without params.
    """
    if isinstance(model, Apply):
        if params is None:
            raise TypeError("internals(apply, params): an Apply needs its params to show the model's structure")
        graphdef, module = model.graphdef, nnx.merge(model.graphdef, params, copy=True)
    elif isinstance(model, nnx.Module):
        graphdef, module = nnx.graphdef(model), model
    else:
        raise TypeError(f"internals() takes a jdiff UNet or DiT (or its functional Apply), got {type(model).__name__}")
    if isinstance(module, UNet):
        return Internals(graphdef, "unet", module.num_cuts, 0)
    if isinstance(module, DiT):
        return Internals(graphdef, "dit", module.num_cuts, module.config.depth)
    raise TypeError(f"internals() knows the cuts of jdiff's UNet and DiT, not of {type(module).__name__}")
