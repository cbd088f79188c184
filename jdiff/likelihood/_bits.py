"""Bits per dimension of quantized data: uniform dequantization (:class:`Dequantization`)
and :func:`bits_per_dim` on top of :func:`jdiff.likelihood.log_likelihood`."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import concrete, error_if
from jdiff._random import _batch_keys, is_key_batch
from jdiff.likelihood._ode import LikelihoodResult, log_likelihood

__all__ = ["BitsResult", "Dequantization", "bits_per_dim"]


class BitsResult(NamedTuple):
    """What :func:`bits_per_dim` returns.

    Attributes:
      bpd: ``(B,)`` bits per dimension of each sample.
      log_prob: ``(B,)`` the model's ``log p(y)`` of the (dequantized) data in nats.
      y: the dequantized data the likelihood was computed at.
      likelihood: the full :class:`LikelihoodResult`.
    """

    bpd: jax.Array
    log_prob: jax.Array
    y: jax.Array
    likelihood: LikelihoodResult


# ------------------------------------------------------------------- dequantization
@dataclasses.dataclass(frozen=True)
class Dequantization:
    """Uniform dequantization of data quantized to ``levels`` equally spaced values.

    The data takes the values ``v_k = low + k * Delta``, ``k = 0 .. levels - 1``,
    ``Delta = (high - low) / (levels - 1)``: both ends are attained, as in
    :mod:`jdiff.data` (8-bit images ``u / 127.5 - 1``: ``levels=256, low=-1, high=1``,
    ``Delta = 2/255``; scikit-learn's digits ``v / 8 - 1`` with pixel counts ``0..16``:
    ``levels=17``, ``Delta = 1/8``). Dequantized data is ``y = v_k + (u - 1/2) Delta``
    with ``u ~ U[0, 1)^D``, so value ``v_k`` owns the bin ``[v_k - Delta/2, v_k + Delta/2)``.

    Why the offset (Theis et al., "A note on the evaluation of generative models",
    ICLR 2016; Ho et al. 2020): the discrete model ``P(k) = Int_bin p(y) dy =
    Delta^D E_u[p(y)] >= Delta^D exp(E_u[log p(y)])`` (Jensen), so

        -log2 P(k) / D <= -log p(y) / (D ln 2) - log2(Delta)     (in expectation over u),

    the number :func:`bits_per_dim` reports: an upper bound on the discrete model's
    bits per dimension. ``-log2(Delta)`` is ``log2(127.5) = 6.994`` for jdiff's 8-bit
    scaling and ``3`` for the digits. (Song et al. 2021 dequantize ``y = (k + u) / 256``
    in ``[0, 1)`` then map to ``[-1, 1)``: bins of width ``2/256`` and offset exactly 7,
    which is ``levels=256, low=-1 + 1/256, high=1 - 1/256`` here.)

    Attributes:
      levels: number of quantization levels (>= 2).
      low, high: the smallest and largest data values (``low < high``).
    """

    levels: int
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self):
        if isinstance(self.levels, bool) or not isinstance(self.levels, (int, np.integer)) or self.levels < 2:
            raise ValueError(f"Dequantization: levels must be an integer >= 2, got {self.levels!r}")
        for name in ("low", "high"):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
                raise ValueError(f"Dequantization: {name} must be a finite number, got {v!r}")
        if not self.low < self.high:
            raise ValueError(f"Dequantization: needs low < high, got low={self.low}, high={self.high}")
        object.__setattr__(self, "levels", int(self.levels))
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))

    @property
    def delta(self) -> float:
        """The bin width ``(high - low) / (levels - 1)``."""
        return (self.high - self.low) / (self.levels - 1)

    @property
    def bits_offset(self) -> float:
        """``-log2(Delta)``: the bits per dimension added to ``-log p(y) / (D ln 2)``."""
        return -math.log2(self.delta)

    def check(self, x):
        """Return ``x`` after checking that every value is one of the ``levels`` values
        (within ``1e-3 Delta``); ``ValueError`` now when ``x`` is concrete, at run time
        under ``jit``."""
        xf = jnp.asarray(x)
        tol = 1e-3 * self.delta
        k = (xf - self.low) / self.delta
        arr = concrete(xf)
        if arr is not None:
            a = np.asarray(arr, np.float64)
            if not np.all(np.isfinite(a)):
                raise ValueError(f"data has {int((~np.isfinite(a)).sum())} non-finite values")
            lo, hi = float(a.min()), float(a.max())
            if lo < self.low - tol or hi > self.high + tol:
                raise ValueError(
                    f"data range [{lo:.6g}, {hi:.6g}] is outside the dequantization range [{self.low}, {self.high}] "
                    f"({self.levels} levels): rescale the data or declare its range"
                )
            kk = (a - self.low) / self.delta
            off = np.abs(kk - np.rint(kk)) * self.delta
            if np.any(off > tol):
                raise ValueError(
                    f"data is not quantized to the declared {self.levels} levels in [{self.low}, {self.high}] "
                    f"(step {self.delta:.6g}): a value is {float(off.max()):.3g} away from the nearest level"
                )
            return x
        bad_range = (xf < self.low - tol) | (xf > self.high + tol) | ~jnp.isfinite(xf)
        xf = error_if(
            xf,
            jnp.any(bad_range),
            f"data outside the dequantization range [{self.low}, {self.high}] ({self.levels} levels)",
        )
        off = jnp.abs(k - jnp.round(k)) * self.delta
        return error_if(xf, jnp.any(off > tol), f"data is not quantized to the declared {self.levels} levels")

    def __call__(self, key, x):
        """Dequantize ``x`` (checked by :meth:`check`): ``x + (u - 1/2) Delta``, the
        uniform noise of sample ``i`` drawn from ``fold_in(key, i)`` (or ``key[i]``)."""
        x = self.check(x)
        x = jnp.asarray(x)
        dt = jnp.result_type(x.dtype, jnp.float32)
        keys = _batch_keys(key, x.shape[0])
        u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], dt))(keys)
        return x.astype(dt) + (u - 0.5) * jnp.asarray(self.delta, dt)


def bits_per_dim(
    denoiser,
    x,
    key=None,
    *,
    dequantization: Dequantization | None = None,
    **kwargs,
) -> BitsResult:
    """Bits per dimension of data ``x`` under a diffusion model (by :func:`log_likelihood`).

    With ``dequantization``, ``x`` must hold quantized values (checked) and is
    dequantized with uniform noise first; the result is
    ``-log p(y) / (D ln 2) - log2(Delta)``, an upper bound (in expectation) on the
    bits per dimension of the discrete data (see :class:`Dequantization`). Without it,
    ``x`` is continuous data and the result is ``-log p(x) / (D ln 2)``.

    Args:
      denoiser, x: as :func:`log_likelihood`.
      key: PRNG key for the dequantization noise and the Hutchinson probes (split in
        two; one key, or one key per sample); required for either.
      dequantization: a :class:`Dequantization` or None.
      **kwargs: passed to :func:`log_likelihood` (``divergence``, ``num_probes``, ...).

    Returns:
      A :class:`BitsResult`.

    Raises:
      ValueError: data outside the declared range or off its levels, a missing key,
        and everything :func:`log_likelihood` raises.
    """
    if dequantization is not None and not isinstance(dequantization, Dequantization):
        raise TypeError(
            f"dequantization must be a jdiff.likelihood.Dequantization, got {type(dequantization).__name__}"
        )
    needs_key = dequantization is not None or kwargs.get("divergence", "exact") == "hutchinson"
    if needs_key and key is None:
        raise ValueError("bits_per_dim needs key= for the dequantization noise or the Hutchinson probes")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be floating point, got dtype {x.dtype}")
    k_deq = k_probe = None
    if key is not None:
        if is_key_batch(key):  # one key per sample: split each
            pair = jax.vmap(jax.random.split)(key)
            k_deq, k_probe = pair[:, 0], pair[:, 1]
        else:
            k_deq, k_probe = jax.random.split(key)
    if dequantization is not None:
        y = dequantization(k_deq, x)
        offset = dequantization.bits_offset
    else:
        y, offset = x, 0.0
    res = log_likelihood(denoiser, y, key=k_probe, **kwargs)
    D = int(np.prod(y.shape[1:]))
    bpd = -res.log_prob / (D * math.log(2.0)) + offset
    return BitsResult(bpd, res.log_prob, y, res)
