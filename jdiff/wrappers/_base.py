"""The base of the denoiser wrappers, the value a guidance wrapper's ``guide`` returns,
and :func:`chain`, which composes wrappers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

from jdiff._param import Prediction, TreeValue
from jdiff.solvers._base import network_calls

__all__ = ["InnerWrapper", "Guided", "Chain", "chain"]


class InnerWrapper(TreeValue):
    """Base of a denoiser wrapper around ``self.inner`` that keeps its process and makes
    the network calls ``inner`` makes (thresholding, classifier guidance, time shift)."""

    @property
    def process(self):
        return self.inner.process

    @property
    def fixed_calls(self):
        return getattr(self.inner, "fixed_calls", 1)

    def calls(self, t):
        return network_calls(self.inner, t)


class Guided(NamedTuple):
    """What a guidance wrapper's ``guide`` returns.

    Attributes:
      pred: the guided prediction (what calling the wrapper returns).
      base: the unguided prediction: the unconditional one (CFG), the weak model's
        (autoguidance), the wrapped denoiser's (classifier guidance); outside a
        guidance interval the conditional one. CFG++ renoises with ``base.eps``.
      memory: the state carried to the next step (APG's momentum average), or None.
    """

    pred: Prediction
    base: Prediction
    memory: Any = None


@dataclasses.dataclass(frozen=True)
class Chain:
    """Wrappers applied in order: ``Chain((a, b))(den) == b(a(den))``. Build with
    :func:`chain`."""

    wrappers: tuple[Callable[[Any], Any], ...]

    def __call__(self, denoiser):
        for wrap in self.wrappers:
            denoiser = wrap(denoiser)
        return denoiser


def chain(*wrappers: Callable[[Any], Any]) -> Chain:
    """Compose denoiser wrappers, as ``optax.chain`` composes gradient transformations.

    Each argument is a function from a denoiser to a denoiser (a wrapper of this
    package with its settings bound, e.g. ``functools.partial(static_threshold, lo=-1,
    hi=1)`` or ``lambda d: guidance(d, 3.0, null)``). The first is applied first, so
    it is the innermost: ``chain(a, b)(den) == b(a(den))``. With thresholding and
    guidance the order matters: ``chain(threshold, cfg)`` clips each of the two
    predictions before they are combined, ``chain(cfg, threshold)`` clips the guided
    one (Imagen's dynamic thresholding acts on the guided prediction: put it last).

    Args:
      *wrappers: callables ``denoiser -> denoiser``, applied in order.

    Returns:
      A :class:`Chain`: call it on a denoiser to get the wrapped denoiser (a value, like
      every wrapper: equal chains around equal denoisers give equal wrappers).

    Raises:
      TypeError: an argument that is not callable.
    """
    for k, wrap in enumerate(wrappers):
        if not callable(wrap):
            raise TypeError(f"chain: argument {k} must be a callable denoiser -> denoiser, got {wrap!r}")
    return Chain(tuple(wrappers))
