"""Guidance as denoiser wrappers: values that take a denoiser and return one.

Every wrapper here works for any process and parameterization: it combines the
``(x0, eps)`` pairs of :class:`~jdiff.Prediction` and keeps ``x = alpha x0 + sigma eps``.

- :func:`guidance`: classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion
  Guidance", 2021), ``p = p_c + (w - 1) (p_c - p_u)`` with both passes in one batched
  call, and its variants as options:

  * ``rescale=phi``: CFG rescale (Lin et al., "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", WACV 2024, Sec. 3.4 and Algorithm 2): the guided
    prediction is multiplied by ``phi std(p_c) / std(p) + (1 - phi)``, with the standard
    deviations per sample over the non-batch axes, in the parameterization
    ``rescale_on`` (default ``"v"``, what the paper's models predict);
  * ``interval=(lo, hi)``: guidance interval (Kynkaanniemi et al., "Applying Guidance in
    a Limited Interval Improves Sample and Distribution Quality in Diffusion Models",
    NeurIPS 2024): guided only while the noise level is in ``(lo, hi]``; outside it
    only the conditional call is made (a ``lax.cond`` on the time), so fewer network
    calls are spent and :attr:`jdiff.SampleInfo.nfe` says how many;
  * ``apg=APG(eta, norm_threshold, momentum)``: adaptive projected guidance (Sadat et
    al., "Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion
    Models", ICLR 2025, Algorithm 1) on the x0 prediction: the update
    ``d = x0_c - x0_u`` is clipped to norm ``norm_threshold``, split into its parts
    parallel and orthogonal to ``x0_c``, and ``x0 = x0_c + (w - 1) (d_orth + eta
    d_par)``. Momentum (``d <- d + beta d_prev``) needs state across steps, which a
    pure denoiser cannot keep: it is carried by the solver (``ddim(guidance_memory=True)``
    or ``euler(guidance_memory=True)``, in ``State.hist``), and calling the wrapper
    without that raises.

- :func:`autoguidance`: a weaker denoiser as the guide (Karras et al., "Guiding a
  Diffusion Model with a Bad Version of Itself", NeurIPS 2024):
  ``D = D_bad + w (D_good - D_bad)``, with the same options.
- :func:`classifier_guidance`: the gradient of a noisy classifier (Dhariwal & Nichol,
  "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021, Algorithm 2):
  ``eps <- eps - w sigma grad_x log p(y | x_t)``, ``x0 <- x0 + w sigma^2 / alpha grad``.
- CFG++ (Chung et al., "CFG++: Manifold-constrained Classifier Free Guidance for
  Diffusion Models", ICLR 2025) renoises with the unguided eps; it changes the update,
  not the prediction, so it is the solver option ``ddim(cfgpp=True)`` /
  ``euler(cfgpp=True)`` that uses :meth:`guide`'s ``base`` prediction.

Scales: a number, one per sample (``(B,)``), a callable ``t -> scale`` or a
:func:`schedule` (values on a time grid, interpolated). Each wrapper is the plain
denoiser exactly at its neutral setting: scale 1 (0 for the classifier), an empty
interval, ``rescale=0``; APG with ``eta = 1``, no clipping and no momentum is CFG up to
rounding.

Network calls: a wrapper's ``calls(t)`` is the number of network calls (forward passes
over the caller's batch) one evaluation makes: 2 for CFG and autoguidance, 1 outside
the interval (or, with per-sample times, when no sample is inside it), 1 for classifier
guidance (whose classifier gradient is not a denoiser call). Solvers add it up. Under
``vmap`` with batched times the ``lax.cond`` becomes a select that runs both branches;
the count then still says how many calls the method needs, not what the select ran.

The guidance interval is on EDM's noise level ``rho = sigma / alpha`` by default
(``interval_on="rho"``; for EDM and VE processes it is their ``sigma``), as in the paper;
``"sigma"`` and ``"t"`` are also accepted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._param import Prediction, TreeValue, broadcast_to_x, check_cond_batch, from_x0_eps, to_x0_eps
from jdiff.solvers._base import network_calls
from jdiff.wrappers._base import Guided
from jdiff.wrappers._scale import _scale_at, _split_scale

__all__ = ["APG", "guidance", "autoguidance"]

_RESCALE_ON = ("x0", "eps", "v")
_INTERVAL_ON = ("rho", "sigma", "t")


@dataclasses.dataclass(frozen=True)
class APG:
    """Settings of adaptive projected guidance (Sadat et al., ICLR 2025, Algorithm 1).

    Attributes:
      eta: weight of the update's part parallel to the conditional x0 (1: CFG's
        parallel part kept; the paper uses 0).
      norm_threshold: the update's per-sample L2 norm is clipped to this (``inf``: no
        clipping; the paper's ``r``).
      momentum: ``beta`` of the running average ``d <- d + beta d_prev`` (the paper uses
        negative values, e.g. -0.5); nonzero needs a solver carrying the memory
        (``ddim(guidance_memory=True)``, ``euler(guidance_memory=True)``).
    """

    eta: float = 0.0
    norm_threshold: float = math.inf
    momentum: float = 0.0

    def __post_init__(self):
        for k in ("eta", "norm_threshold", "momentum"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"APG {k} must be a number, got {v!r}")
            object.__setattr__(self, k, float(v))
        if not math.isfinite(self.eta):
            raise ValueError(f"APG eta must be finite, got {self.eta}")
        if not self.norm_threshold > 0:
            raise ValueError(f"APG norm_threshold must be > 0 (inf: no clipping), got {self.norm_threshold}")
        if not -1.0 < self.momentum < 1.0:
            raise ValueError(f"APG momentum must be in (-1, 1), got {self.momentum}")


def _per_sample_sum(a):
    return jnp.sum(a, axis=tuple(range(1, a.ndim)), keepdims=True)


def _apg_update(d, x0_c, apg: APG):
    """The APG update from the (momentum-averaged) difference ``d``: clip, project, mix."""
    if math.isfinite(apg.norm_threshold):
        n = jnp.sqrt(_per_sample_sum(d * d))
        d = d * jnp.where(n > apg.norm_threshold, apg.norm_threshold / jnp.where(n > 0, n, 1.0), 1.0)
    n_c = jnp.sqrt(_per_sample_sum(x0_c * x0_c))
    u = x0_c / jnp.where(n_c > 0, n_c, 1.0)  # a zero x0_c has no parallel direction
    par = _per_sample_sum(d * u) * u
    return (d - par) + apg.eta * par


def _check_interval(interval, interval_on):
    if interval_on not in _INTERVAL_ON:
        raise ValueError(f"interval_on must be one of {_INTERVAL_ON}, got {interval_on!r}")
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"interval must be a pair (lo, hi) of numbers, got {interval!r}") from None
    if math.isnan(lo) or math.isnan(hi) or not 0.0 <= lo <= hi:
        raise ValueError(
            f"the guidance interval (lo, hi] = ({lo}, {hi}] must satisfy 0 <= lo <= hi (hi may be inf; "
            "lo == hi is the empty interval)"
        )
    return (lo, hi)


def _check_rescale(rescale, rescale_on):
    if rescale_on not in _RESCALE_ON:
        raise ValueError(f"rescale_on must be one of {_RESCALE_ON}, got {rescale_on!r}")
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float, np.integer, np.floating)):
        raise TypeError(f"rescale must be a number in [0, 1], got {rescale!r}")
    if not 0.0 <= float(rescale) <= 1.0:
        raise ValueError(f"rescale (phi) must be in [0, 1], got {rescale}")
    return float(rescale)


@dataclasses.dataclass(frozen=True, eq=False)
class _Guidance(TreeValue):
    """Classifier-free guidance (``kind="cfg"``: ``other`` is the null conditioning) or
    autoguidance (``kind="auto"``: ``other`` is the weak denoiser); see the module."""

    inner: Any
    scale: Any
    other: Any
    kind: str = "cfg"
    scale_fn: Any = None
    rescale: float = 0.0
    rescale_on: str = "v"
    interval: Any = None
    interval_on: str = "rho"
    apg: Any = None
    batched: bool = True

    @property
    def process(self):
        return self.inner.process

    @property
    def null_cond(self):
        return self.other if self.kind == "cfg" else None

    # ---- network calls
    def _guided_calls(self, t):
        if self.kind == "cfg":
            return 2 * network_calls(self.inner, t)
        return network_calls(self.inner, t) + network_calls(self.other, t)

    @property
    def fixed_calls(self):
        """Network calls per evaluation when they do not depend on t, else None."""
        if self.interval is not None:
            return None
        inner = getattr(self.inner, "fixed_calls", 1)
        other = getattr(self.other, "fixed_calls", 1) if self.kind == "auto" else inner
        return None if inner is None or other is None else inner + other

    def calls(self, t):
        """Network calls (passes over the caller's batch) of one evaluation at ``t``."""
        if self.interval is None:
            return self._guided_calls(t)
        if self.interval[0] == self.interval[1]:
            return network_calls(self.inner, t)
        return jnp.where(jnp.any(self._inside(t)), self._guided_calls(t), network_calls(self.inner, t))

    def _inside(self, t):
        """Whether the noise level at ``t`` (scalar or ``(B,)``) is in ``(lo, hi]``."""
        t = jnp.asarray(t)
        t = t.astype(jnp.result_type(t.dtype, jnp.float32))
        p = self.process
        level = {"rho": p.rho, "sigma": p.sigma, "t": lambda s: s}[self.interval_on](t)
        lo, hi = self.interval
        return (level > lo) & (level <= hi)

    # ---- predictions
    def _pair(self, x, t, cond):
        """``(p_c, p_u)``: conditional and unconditional (or good and bad) predictions."""
        if self.kind == "auto":
            return self.inner(x, t, cond), self.other(x, t, cond)
        if cond is None:
            raise ValueError("guidance needs a conditioning: pass cond= to sample()")
        B = x.shape[0]
        check_cond_batch(cond, B, "x", x.shape)  # the caller's batch, not the doubled one

        def null(c, n):
            c = jnp.asarray(c)
            return jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)

        if not self.batched:  # two calls of B: the conditional one is the plain call
            return self.inner(x, t, cond), self.inner(x, t, jax.tree.map(null, cond, self.other))

        c2 = jax.tree.map(lambda c, n: jnp.concatenate([jnp.asarray(c), null(c, n)], axis=0), cond, self.other)
        t = jnp.asarray(t)
        t2 = t if t.ndim == 0 else jnp.concatenate([t, t])
        p = self.inner(jnp.concatenate([x, x], axis=0), t2, c2)
        return Prediction(p.x0[:B], p.eps[:B]), Prediction(p.x0[B:], p.eps[B:])

    def _combine(self, x, t, pc, pu, w, memory):
        """The guided prediction from the pair, with the scale ``w`` (broadcast)."""
        if self.apg is None:
            # p_c + (w - 1)(p_c - p_u) = p_u + w (p_c - p_u), written so that w = 1 is p_c exactly
            g = Prediction(pc.x0 + (w - 1) * (pc.x0 - pu.x0), pc.eps + (w - 1) * (pc.eps - pu.eps))
            new_memory = memory
        else:
            d = pc.x0 - pu.x0
            if self.apg.momentum != 0.0:
                if memory is None:
                    raise ValueError(
                        "APG momentum needs state across steps, which a denoiser cannot keep: sample with "
                        "jdiff.solvers.ddim(guidance_memory=True) or euler(guidance_memory=True), or use momentum=0"
                    )
                d = d + self.apg.momentum * memory.astype(d.dtype)
            new_memory = d
            x0 = pc.x0 + (w - 1) * _apg_update(d, pc.x0, self.apg)
            # the eps that keeps x = alpha x0 + sigma eps: eps_c - (alpha / sigma)(x0 - x0_c)
            a = broadcast_to_x(self.process.alpha(jnp.asarray(t, x0.dtype)), x0)
            s = broadcast_to_x(self.process.sigma(jnp.asarray(t, x0.dtype)), x0)
            eps = pc.eps - jnp.where(s > 0, a / jnp.where(s > 0, s, 1.0), 0.0) * (x0 - pc.x0)
            g = Prediction(x0, eps)
        if self.rescale != 0.0:
            g = self._rescaled(x, t, pc, g)
        return g, new_memory

    def _rescaled(self, x, t, pc, g):
        k, proc = self.rescale_on, self.process
        out_g = from_x0_eps(k, g.x0, g.eps, t, proc)
        out_c = from_x0_eps(k, pc.x0, pc.eps, t, proc)
        axes = tuple(range(1, x.ndim))
        sd_c = jnp.std(out_c, axis=axes, keepdims=True)
        sd_g = jnp.std(out_g, axis=axes, keepdims=True)
        ratio = jnp.where(sd_g > 0, sd_c / jnp.where(sd_g > 0, sd_g, 1.0), 1.0)
        factor = self.rescale * ratio + (1.0 - self.rescale)
        p = to_x0_eps(k, out_g * factor, x.astype(out_g.dtype), t, proc)
        return Prediction(p.x0.astype(g.x0.dtype), p.eps.astype(g.eps.dtype))

    def _guided(self, x, t, cond, memory, inside=None):
        w = _scale_at(self.scale, self.scale_fn, t, x)
        pc, pu = self._pair(x, t, cond)
        w = w.astype(pc.x0.dtype)
        if inside is not None and jnp.ndim(inside) > 0:  # per-sample times: scale 1 outside
            w = jnp.where(broadcast_to_x(inside, pc.x0), w, jnp.ones((), pc.x0.dtype))
        g, new_memory = self._combine(x, t, pc, pu, w, memory)
        if inside is not None and jnp.ndim(inside) > 0:
            m = broadcast_to_x(inside, pc.x0)
            g = Prediction(jnp.where(m, g.x0, pc.x0), jnp.where(m, g.eps, pc.eps))
            if memory is not None:
                new_memory = jnp.where(m, new_memory, memory.astype(new_memory.dtype)).astype(memory.dtype)
        if memory is not None and new_memory is not None:
            new_memory = new_memory.astype(memory.dtype)
        return Guided(g, pu, new_memory)

    def guide(self, x, t, cond=None, memory=None) -> Guided:
        """The guided prediction, the unguided one and the next memory (see :class:`Guided`)."""
        if self.kind == "cfg" and cond is None:
            raise ValueError("guidance needs a conditioning: pass cond= to sample()")
        if self.interval is None:
            return self._guided(x, t, cond, memory)
        if self.interval[0] == self.interval[1]:  # empty: the conditional call alone
            return Guided(*(2 * (self.inner(x, t, cond),)), memory)
        inside = self._inside(t)

        def plain():
            p = self.inner(x, t, cond)
            return Guided(p, p, memory)

        def guided():
            return self._guided(x, t, cond, memory, inside)

        return jax.lax.cond(jnp.any(inside), guided, plain)

    def __call__(self, x, t, cond=None) -> Prediction:
        return self.guide(x, t, cond, None).pred


jax.tree_util.register_dataclass(
    _Guidance,
    data_fields=["inner", "scale", "other"],
    meta_fields=["kind", "scale_fn", "rescale", "rescale_on", "interval", "interval_on", "apg", "batched"],
)


def _check_denoiser(den, what):
    if getattr(den, "process", None) is None or not callable(den):
        raise TypeError(f"{what} must be a jdiff denoiser (see jdiff.denoiser), got {type(den).__name__}")


def _check_apg(apg):
    if apg is not None and not isinstance(apg, APG):
        raise TypeError(f"apg must be a jdiff.wrappers.APG(...) or None, got {apg!r}")
    return apg


def guidance(
    denoiser,
    scale,
    null_cond,
    *,
    rescale: float = 0.0,
    rescale_on: str = "v",
    interval=None,
    interval_on: str = "rho",
    apg: APG | None = None,
    batched: bool = True,
):
    """Classifier-free guidance (Ho & Salimans, 2021) and its variants.

    ``p = p_u + w (p_c - p_u)``, computed as ``p_c + (w - 1)(p_c - p_u)`` so that
    ``w = 1`` is the conditional prediction exactly; the conditional and unconditional
    passes run as one batch of ``2B`` (2 network calls), or as two calls of ``B`` with
    ``batched=False``.

    Args:
      denoiser: a conditional :class:`~jdiff.Denoiser` (or a wrapper of one).
      scale: the guidance weight ``w`` (1: the conditional model, 0: unconditional): a
        number, one per sample ``(B,)``, a callable ``t -> w`` (``t`` scalar or
        ``(B,)``) or a :func:`schedule`.
      null_cond: the unconditional conditioning (e.g. the null class label), broadcast
        to the shape of ``cond``.
      rescale: ``phi`` of CFG rescale (Lin et al., WACV 2024, Algorithm 2): the guided
        output times ``phi std(p_c) / std(p) + 1 - phi`` (per sample, over the
        non-batch axes); 0 turns it off.
      rescale_on: the parameterization rescaled: ``"v"`` (the paper's), ``"eps"`` or
        ``"x0"``.
      interval: ``(lo, hi)``: guide only while the noise level is in ``(lo, hi]``
        (Kynkaanniemi et al., NeurIPS 2024); elsewhere only the conditional call is
        made. ``lo == hi`` is empty (never guided). None: everywhere.
      interval_on: the noise level of ``interval``: ``"rho"`` (``sigma / alpha``, EDM's
        sigma, the paper's), ``"sigma"`` or ``"t"``.
      apg: :class:`APG` settings for adaptive projected guidance (Sadat et al., 2025)
        instead of the plain difference.
      batched: one call of ``2B`` (faster on accelerators) or two calls of ``B``. A
        network's rounding may depend on the batch it sees (XLA vectorizes a batch of
        ``2B`` differently), so only ``batched=False`` makes ``w = 1`` equal the plain
        denoiser bit for bit; batched, it equals the conditional half of the ``2B`` call.

    Returns:
      A denoiser wrapper (a pytree value) with ``calls(t)`` and ``guide``.

    Raises:
      ValueError: a scale that is not finite or not one per sample, ``rescale`` outside
        [0, 1], an interval with ``lo < 0``, ``hi < lo`` or NaN, an unknown
        ``rescale_on``/``interval_on``; at call time, no ``cond``.
      TypeError: ``denoiser`` is not a denoiser, ``apg`` not an :class:`APG`.
    """
    _check_denoiser(denoiser, "denoiser")
    leaf, fn = _split_scale(scale)
    return _Guidance(
        denoiser,
        leaf,
        null_cond,
        "cfg",
        fn,
        _check_rescale(rescale, rescale_on),
        rescale_on,
        _check_interval(interval, interval_on),
        interval_on,
        _check_apg(apg),
        _check_flag(batched, "batched"),
    )


def _check_flag(v, what):
    if not isinstance(v, bool):
        raise TypeError(f"{what} must be True or False, got {v!r}")
    return v


def autoguidance(
    denoiser,
    guide_denoiser,
    scale,
    *,
    rescale: float = 0.0,
    rescale_on: str = "v",
    interval=None,
    interval_on: str = "rho",
    apg: APG | None = None,
):
    """Autoguidance (Karras et al., "Guiding a Diffusion Model with a Bad Version of
    Itself", NeurIPS 2024, Eq. 1 with the bad model as the guide):
    ``D = D_bad + w (D_good - D_bad)``, computed as ``D_good + (w - 1)(D_good - D_bad)``
    so that ``w = 1`` is the good model exactly. Both models get the same ``cond``.

    Args:
      denoiser: the good denoiser.
      guide_denoiser: the weaker guide (smaller or less trained), for the same process.
      scale, rescale, rescale_on, interval, interval_on, apg: as in :func:`guidance`.

    Returns:
      A denoiser wrapper; one evaluation makes the calls of both models.

    Raises:
      ValueError, TypeError: as :func:`guidance`; also denoisers of different processes.
    """
    _check_denoiser(denoiser, "denoiser")
    _check_denoiser(guide_denoiser, "guide_denoiser")
    pa, pb = denoiser.process, guide_denoiser.process
    if pa is not pb and (type(pa) is not type(pb) or jax.tree.structure(pa) != jax.tree.structure(pb)):
        raise ValueError(
            f"autoguidance needs two denoisers of one process, got {type(pa).__name__} and {type(pb).__name__}"
        )
    leaf, fn = _split_scale(scale)
    return _Guidance(
        denoiser,
        leaf,
        guide_denoiser,
        "auto",
        fn,
        _check_rescale(rescale, rescale_on),
        rescale_on,
        _check_interval(interval, interval_on),
        interval_on,
        _check_apg(apg),
    )
