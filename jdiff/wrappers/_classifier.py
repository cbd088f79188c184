"""Classifier guidance with a noisy classifier's gradient (Dhariwal & Nichol, NeurIPS
2021): see :func:`classifier_guidance`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jdiff._checks import error_if
from jdiff._param import Prediction, _FnKey, broadcast_to_x
from jdiff.wrappers._base import Guided, InnerWrapper
from jdiff.wrappers._guidance import _check_denoiser
from jdiff.wrappers._scale import _scale_at, _split_scale

__all__ = ["classifier_guidance"]


@dataclasses.dataclass(frozen=True, eq=False)
class _ClassifierGuidance(InnerWrapper):
    inner: Any
    scale: Any
    params: Any
    labels: Any
    classifier: Any = None  # _FnKey
    scale_fn: Any = None

    def log_prob_grad(self, x, t, labels):
        """Per-sample ``grad_x log p(y | x_t)`` (the gradient of the sum over the batch
        of the selected log-probabilities; a classifier that treats samples
        independently makes each row the gradient of its own term)."""
        y = self._labels(x, t, labels)
        tb = self._times(x, t)
        fn = self.classifier.fn

        def total(xx):
            logits = fn(xx, tb) if self.params is None else fn(self.params, xx, tb)
            lp = jax.nn.log_softmax(logits.astype(jnp.result_type(logits.dtype, jnp.float32)), axis=-1)
            return jnp.sum(jnp.take_along_axis(lp, y[:, None], axis=1))

        return jax.grad(total)(x)

    @staticmethod
    def _times(x, t):
        t = jnp.asarray(t)
        return jnp.broadcast_to(t, (x.shape[0],)) if t.ndim == 0 else t

    def _labels(self, x, t, labels):
        """The labels, checked (shape, dtype, range against the classifier's output
        shape, found without running it) before anything is computed."""
        B = x.shape[0]
        y = jnp.asarray(labels)
        if y.shape != (B,) or not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"classifier guidance needs integer labels of shape ({B},), got {y.dtype} {y.shape}")
        fn, tb = self.classifier.fn, self._times(x, t)
        out = jax.eval_shape(lambda xx: fn(xx, tb) if self.params is None else fn(self.params, xx, tb), x)
        if len(getattr(out, "shape", ())) != 2 or out.shape[0] != B:
            raise ValueError(f"the classifier must return logits of shape ({B}, C), got {getattr(out, 'shape', out)}")
        C = out.shape[1]
        return error_if(y, jnp.any((y < 0) | (y >= C)), f"class labels must be in [0, {C})")

    def guide(self, x, t, cond=None, memory=None) -> Guided:
        labels = cond if self.labels is None else self.labels
        if labels is None:
            raise ValueError("classifier guidance needs class labels: pass labels= or cond= to sample()")
        w = _scale_at(self.scale, self.scale_fn, t, x)
        self._labels(x, t, labels)  # checked before the denoiser runs
        p = self.inner(x, t, cond)
        w = w.astype(p.x0.dtype)
        g = self.log_prob_grad(x.astype(p.x0.dtype), t, labels).astype(p.x0.dtype)
        tt = jnp.asarray(t, p.x0.dtype)
        a = broadcast_to_x(self.process.alpha(tt), p.x0)
        s = broadcast_to_x(self.process.sigma(tt), p.x0)
        # score + w grad log p(y|x): eps -= w sigma grad, x0 += w sigma^2 / alpha grad
        # (Tweedie); at alpha = 0 x0 is undefined and the step adds nothing
        ok = a > 0
        wg = jnp.where(ok, w * g, 0.0)
        x0 = p.x0 + (s * s / jnp.where(ok, a, 1.0)) * wg
        eps = p.eps - s * wg
        return Guided(Prediction(x0, eps), p, memory)

    def __call__(self, x, t, cond=None) -> Prediction:
        return self.guide(x, t, cond).pred


jax.tree_util.register_dataclass(
    _ClassifierGuidance, data_fields=["inner", "scale", "params", "labels"], meta_fields=["classifier", "scale_fn"]
)


def classifier_guidance(denoiser, classifier, scale, *, params=None, labels=None):
    """Classifier guidance with a noisy classifier's gradient (Dhariwal & Nichol,
    "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021, Sec. 4 and
    Algorithm 2, written for any process): the score ``-eps / sigma`` gains
    ``w grad_x log p(y | x_t)``, so ``eps <- eps - w sigma grad`` and, keeping
    ``x = alpha x0 + sigma eps``, ``x0 <- x0 + w sigma^2 / alpha grad``.

    Args:
      denoiser: the denoiser to guide (conditional or not).
      classifier: ``classifier(x, t) -> logits (B, C)``, or
        ``classifier(params, x, t)`` when ``params`` is given; ``t`` is the process time,
        shape ``(B,)``. Samples must be classified independently (no batch statistics):
        the gradient of the batch sum is then each sample's own gradient.
      scale: the weight ``w`` (0: the plain denoiser), as in :func:`guidance`.
      params: the classifier's parameters (a pytree), or None.
      labels: ``(B,)`` integer classes to guide towards; None takes them from ``cond``.

    Returns:
      A denoiser wrapper; one evaluation is one denoiser call (``calls(t)`` = 1) plus a
      classifier forward and backward pass.

    Raises:
      ValueError: a non-finite scale; at call time labels that are not ``(B,)``
        integers or outside ``[0, C)``, logits that are not ``(B, C)``.
      TypeError: ``classifier`` is not callable, ``denoiser`` not a denoiser.
    """
    _check_denoiser(denoiser, "denoiser")
    if not callable(classifier):
        raise TypeError(f"classifier must be a callable (x, t) -> logits, got {type(classifier).__name__}")
    leaf, fn = _split_scale(scale)
    return _ClassifierGuidance(denoiser, leaf, params, labels, _FnKey(classifier), fn)
