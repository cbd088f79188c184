"""Variance-preserving processes (``alpha^2 + sigma^2 = 1``: linear, cosine, discrete
tables) and sub-VP, with their factories and DDPM beta tables."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._process._base import Process, _as_float, _register

__all__ = [
    "VPLinear",
    "VPCosine",
    "VPDiscrete",
    "SubVP",
    "vp_linear",
    "vp_cosine",
    "vp_discrete",
    "sub_vp",
    "ddpm_betas",
    "rescale_zero_terminal_snr",
]


def _log_alpha_from_lambda_vp(lam):
    # For alpha^2 + sigma^2 = 1: alpha^2 = sigmoid(2 lambda), so log alpha = -softplus(-2 lambda) / 2.
    return -0.5 * jax.nn.softplus(-2.0 * lam)


def _log_sigma_from_log_alpha_vp(log_alpha):
    # sigma = sqrt(1 - alpha^2), computed without cancellation near alpha = 1.
    return 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def _vp_sigma(alpha, log_alpha):
    """``sqrt(1 - alpha^2)``: through ``expm1`` where alpha is near 1 (no cancellation),
    directly where alpha is small (finite derivative at alpha = 0)."""
    small = alpha < 0.5
    la_safe = jnp.where(small, -1.0, log_alpha)
    near_one = jnp.exp(_log_sigma_from_log_alpha_vp(la_safe))
    a_safe = jnp.where(small, alpha, 0.0)
    far = jnp.sqrt(1.0 - a_safe * a_safe)
    return jnp.where(small, far, near_one)


# ---------------------------------------------------------------------------- VP


class _VP(Process):
    """Variance preserving: ``sigma = sqrt(1 - alpha^2)``, from ``log alpha`` without
    cancellation (subclasses give ``log_alpha`` and ``t_of_lambda``)."""

    def log_sigma(self, t):
        return _log_sigma_from_log_alpha_vp(self.log_alpha(t))

    def sigma(self, t):
        t = _as_float(t)
        return _vp_sigma(self.alpha(t), self.log_alpha(t))


@dataclasses.dataclass(frozen=True, repr=False)
class VPLinear(_VP):
    """Variance-preserving process with a linear ``beta(t)`` (DDPM's continuous limit).

    ``log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2``,
    ``sigma = sqrt(1 - alpha^2)``. Song et al., "Score-Based Generative Modeling through
    Stochastic Differential Equations", ICLR 2021; the closed-form inverse ``t(lambda)``
    follows Lu et al., "DPM-Solver", NeurIPS 2022, Appendix.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    t_data: float | None = 0.0
    name: str = "vp_linear"

    def log_alpha(self, t):
        t = _as_float(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _t_of_log_alpha(self, log_alpha):
        # Solve a t^2 + b t + log_alpha = 0 for t >= 0 in the cancellation-free form.
        a = 0.25 * (self.beta_max - self.beta_min)
        b = 0.5 * self.beta_min
        c = log_alpha
        return -2.0 * c / (b + jnp.sqrt(b * b - 4.0 * a * c))

    def t_of_lambda(self, lam):
        lam = _as_float(lam)
        return self._t_of_log_alpha(_log_alpha_from_lambda_vp(lam))


@dataclasses.dataclass(frozen=True, repr=False)
class VPCosine(_VP):
    """Variance-preserving process with the cosine schedule of Nichol & Dhariwal,
    "Improved Denoising Diffusion Probabilistic Models", ICML 2021:
    ``alpha(t) = cos((t + s)/(1 + s) * pi/2) / cos(s/(1 + s) * pi/2)``.

    ``alpha(1) = 0`` (zero terminal SNR); the default ``t_max = 0.9946`` follows
    DPM-Solver, which clips the end where ``beta`` exceeds 0.999. Pass ``t_max=1.0`` for
    the zero-terminal-SNR process (use an x0, v or flow parameterization there).
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946
    t_data: float | None = 0.0
    name: str = "vp_cosine"

    def _log_alpha_0(self):
        return math.log(math.cos(math.pi / 2 * self.s / (1.0 + self.s)))

    def log_alpha(self, t):
        # log(cos(a + d) / cos(a)) = log1p(-2 sin^2(d/2) - tan(a) sin(d)), a = pi/2 s/(1+s),
        # d = pi/2 t/(1+s): no cancellation near t = 0, where sigma is small.
        t = _as_float(t)
        a = math.pi / 2 * self.s / (1.0 + self.s)
        d = jnp.pi / 2 * t / (1.0 + self.s)
        arg = -2.0 * jnp.sin(0.5 * d) ** 2 - math.tan(a) * jnp.sin(d)
        return jnp.log1p(jnp.maximum(arg, -1.0))

    def alpha(self, t):
        t = _as_float(t)
        c = jnp.cos(jnp.pi / 2 * (t + self.s) / (1.0 + self.s))
        return jnp.maximum(c, 0.0) / math.exp(self._log_alpha_0())

    def t_of_lambda(self, lam):
        lam = _as_float(lam)
        # cos(a + d) = alpha cos(a) with a = pi/2 s/(1+s), d = pi/2 t/(1+s). Written as
        # d = arcsin(cos(a) sigma^2 / (sqrt(sin^2 a + cos^2 a sigma^2) + alpha sin a)), it has
        # no cancellation anywhere (sigma^2 = 1 - alpha^2 straight from lambda).
        a = math.pi / 2 * self.s / (1.0 + self.s)
        ca, sa = math.cos(a), math.sin(a)
        sig2 = jax.nn.sigmoid(-2.0 * lam)
        alpha = jnp.exp(_log_alpha_from_lambda_vp(lam))
        d = jnp.arcsin(jnp.clip(ca * sig2 / (jnp.sqrt(sa * sa + ca * ca * sig2) + alpha * sa), 0.0, 1.0))
        return 2.0 * (1.0 + self.s) / jnp.pi * d


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class VPDiscrete(_VP):
    """A discrete-time VP process from a table ``alphas_cumprod[n], n = 0..N-1``
    (DDPM's 1000-step schedules), made continuous as in DPM-Solver (Lu et al. 2022,
    Sec. 3.4): step ``n`` sits at ``t_n = (n + 1) / N`` and ``log alpha`` is
    piecewise linear in t, with ``log alpha(0) = 0`` at the data.

    A table whose last entry is 0 (zero terminal SNR, Lin et al., "Common Diffusion
    Noise Schedules and Sample Steps are Flawed", WACV 2024) interpolates ``alpha``
    itself on the last interval, so ``alpha(1) = 0`` exactly.

    Models trained on the table take the (possibly fractional) step index
    :meth:`timestep` ``= N t - 1`` as their time input.
    """

    log_alphas: Any = None  # (N + 1,) including t = 0
    t_min: float = 1e-3
    t_max: float = 1.0
    t_data: float | None = 0.0
    num_train_steps: int = 1000
    zero_terminal_snr: bool = False
    name: str = "vp_discrete"

    discrete = True
    default_time_input = "timestep"

    def _tables(self):
        la = jnp.asarray(self.log_alphas)
        ts = jnp.linspace(0.0, 1.0, self.num_train_steps + 1, dtype=la.dtype)
        return ts, la

    def log_alpha(self, t):
        t = _as_float(t)
        ts, la = self._tables()
        la = la.astype(t.dtype)
        ts = ts.astype(t.dtype)
        if not self.zero_terminal_snr:
            return jnp.interp(t, ts, la)
        # All but the last interval: linear in log alpha; last interval: linear in alpha.
        la_fin = la[:-1]
        body = jnp.interp(jnp.minimum(t, ts[-2]), ts[:-1], la_fin)
        w = jnp.clip((t - ts[-2]) / (ts[-1] - ts[-2]), 0.0, 1.0)
        a_last = jnp.exp(la_fin[-1]) * (1.0 - w)
        tail = jnp.log(jnp.maximum(a_last, 0.0))
        return jnp.where(t > ts[-2], tail, body)

    def alpha(self, t):
        if not self.zero_terminal_snr:
            return jnp.exp(self.log_alpha(t))
        t = _as_float(t)
        ts, la = self._tables()
        la = la.astype(t.dtype)
        ts = ts.astype(t.dtype)
        body = jnp.exp(jnp.interp(jnp.minimum(t, ts[-2]), ts[:-1], la[:-1]))
        w = jnp.clip((t - ts[-2]) / (ts[-1] - ts[-2]), 0.0, 1.0)
        return jnp.where(t > ts[-2], jnp.exp(la[-2]) * (1.0 - w), body)

    def t_of_lambda(self, lam):
        lam = _as_float(lam)
        ts, la = self._tables()
        la = la.astype(lam.dtype)
        ts = ts.astype(lam.dtype)
        log_alpha = _log_alpha_from_lambda_vp(lam)
        if not self.zero_terminal_snr:
            return jnp.interp(-log_alpha, -la, ts, left=0.0, right=jnp.inf)
        body = jnp.interp(-log_alpha, -la[:-1], ts[:-1], left=0.0, right=ts[-2])
        a_prev = jnp.exp(la[-2])
        w = 1.0 - jnp.exp(log_alpha) / a_prev
        tail = ts[-2] + jnp.clip(w, 0.0, 1.0) * (ts[-1] - ts[-2])
        return jnp.where(log_alpha < la[-2], tail, body)

    def timestep(self, t):
        """The model's discrete time input ``N * t - 1`` (fractional between steps)."""
        return _as_float(t) * self.num_train_steps - 1.0


def ddpm_betas(kind: str = "linear", num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """Return a numpy ``betas`` table: ``'linear'`` (Ho et al. 2020),
    ``'scaled_linear'`` (Stable Diffusion: linear in sqrt(beta)) or ``'cosine'``
    (Nichol & Dhariwal 2021, betas clipped at 0.999)."""
    n = num_train_steps
    if kind == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if kind == "cosine":
        s = 0.008
        steps = np.arange(n + 1, dtype=np.float64) / n
        f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
        return np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; expected 'linear', 'scaled_linear' or 'cosine'")


def rescale_zero_terminal_snr(betas):
    """Rescale a ``betas`` table so that the final ``alphas_cumprod`` is exactly zero,
    keeping the first one (Lin et al., WACV 2024, Algorithm 1)."""
    betas = np.asarray(betas, dtype=np.float64)
    sqrt_ac = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / np.where(ac[:-1] > 0, ac[:-1], 1.0)])
    return 1.0 - alphas


# -------------------------------------------------------------------------- sub-VP


@dataclasses.dataclass(frozen=True, repr=False)
class SubVP(Process):
    """The sub-VP process of Song et al. (ICLR 2021): ``alpha`` as in :class:`VPLinear`
    and ``sigma = 1 - alpha^2``."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    t_data: float | None = 0.0
    name: str = "sub_vp"

    def log_alpha(self, t):
        return VPLinear(self.beta_min, self.beta_max).log_alpha(t)

    def log_sigma(self, t):
        return jnp.log(-jnp.expm1(2.0 * self.log_alpha(t)))

    def t_of_lambda(self, lam):
        lam = _as_float(lam)
        # alpha / (1 - alpha^2) = e^lam  =>  alpha = 2 / (u + sqrt(u^2 + 4)),  u = e^{-lam}.
        u = jnp.exp(-lam)
        log_alpha = jnp.minimum(math.log(2.0) - jnp.log(u + jnp.sqrt(u * u + 4.0)), 0.0)
        return VPLinear(self.beta_min, self.beta_max)._t_of_log_alpha(log_alpha)


_register(VPLinear)
_register(VPCosine)
_register(VPDiscrete, data_fields=("log_alphas",))
_register(SubVP)


# ---------------------------------------------------------------------- factories


def vp_linear(beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0) -> VPLinear:
    """The VP-SDE with linear beta (see :class:`VPLinear`)."""
    return VPLinear(beta_min=beta_min, beta_max=beta_max, t_min=t_min, t_max=t_max)


def vp_cosine(s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946) -> VPCosine:
    """The cosine VP schedule (see :class:`VPCosine`)."""
    return VPCosine(s=s, t_min=t_min, t_max=t_max)


def vp_discrete(betas=None, *, alphas_cumprod=None, t_min: float | None = None) -> VPDiscrete:
    """A discrete-time VP process from ``betas`` or ``alphas_cumprod`` (see
    :class:`VPDiscrete`). With neither, DDPM's linear 1000-step schedule is used."""
    if alphas_cumprod is None:
        if betas is None:
            betas = ddpm_betas("linear")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or np.any(betas < 0) or np.any(betas > 1):
            raise ValueError("betas must be a 1-D table of values in [0, 1]")
        alphas_cumprod = np.cumprod(1.0 - betas)
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    if ac.ndim != 1 or ac.size < 2:
        raise ValueError("alphas_cumprod must be a 1-D table with at least 2 entries")
    if np.any(np.diff(ac) >= 0) or ac[0] > 1 or ac[-1] < 0:
        raise ValueError("alphas_cumprod must be strictly decreasing in (0, 1]")
    zero_snr = bool(ac[-1] == 0.0)
    with np.errstate(divide="ignore"):
        la = np.concatenate([[0.0], 0.5 * np.log(ac)])
    n = ac.size
    return VPDiscrete(
        log_alphas=la,
        t_min=(1.0 / n) if t_min is None else t_min,
        t_max=1.0,
        num_train_steps=n,
        zero_terminal_snr=zero_snr,
    )


def sub_vp(beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0) -> SubVP:
    """The sub-VP SDE (see :class:`SubVP`)."""
    return SubVP(beta_min=beta_min, beta_max=beta_max, t_min=t_min, t_max=t_max)
