"""DDIM (Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021, Eq. 12).

    x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps + c z,   c = eta sigma_t sqrt(1 - e^{-2h})

``c`` is DDIM's ``sigma_t(eta)`` written for any process: ``sigma_t^2 (1 - e^{-2h})`` is the
variance of ``q(x_t | x_s, x0)``, so ``eta = 1`` is DDPM's ancestral sampler (Ho et al.
2020) and ``eta = 0`` the deterministic DDIM, which is also DPM-Solver-1 and
DPM-Solver++(1).

Guidance options (the denoiser must then be a wrapper of :mod:`jdiff.wrappers`):
``cfgpp=True`` is CFG++ (Chung et al., "CFG++: Manifold-constrained Classifier Free
Guidance for Diffusion Models", 2024, Algorithm 1): the guided x0 is renoised with the
*unguided* noise prediction, ``x_t = alpha_t x0_guided + sqrt(sigma_t^2 - c^2) eps_uncond
+ c z``; its scale is the paper's lambda, typically in [0, 1], and at scale 0 it is DDIM
on the unconditional model. ``guidance_memory=True`` carries the wrapper's state from
step to step in ``State.hist`` (APG's momentum, Sadat et al., 2024).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jdiff._core import geometry_from
from jdiff.solvers._base import (
    Solver,
    check_key,
    empty_state,
    grid_curves,
    guided_evaluate,
    network_calls,
    row,
    settings_name,
    step_noise,
)

__all__ = ["DDIM", "ddim", "ddpm", "DDIMTable", "ddim_table", "ddim_coefficients"]


class DDIMTable(NamedTuple):
    """DDIM's per-step coefficients: ``x_t = a x0 + keep eps + c z`` for each step ``s -> t``."""

    a: jax.Array  # alpha_t
    keep: jax.Array  # sqrt(sigma_t^2 - c^2)
    c: jax.Array  # noise scale


def ddim_table(process, grid, eta) -> DDIMTable:
    """The coefficients of every DDIM step ``grid[i] -> grid[i + 1]`` (Eq. 12 with the noise
    ``c = eta sigma_t sqrt(1 - e^{-2h})``, module docstring), vectorized over the grid.

    This is the one place DDIM's coefficients are computed: the solver, the posterior
    samplers of :mod:`jdiff.inverse_problems` (through the solver) and edit-friendly DDPM
    inversion all read it. A step with infinite log-SNR increment (a start at alpha = 0,
    an end at sigma = 0) gets ``c = 0`` and ``keep = 0``: the exact jump to ``alpha_t x0``.

    Args:
      process: the process.
      grid: ``(N + 1,)`` times (either direction).
      eta: DDIM's stochasticity in [0, 1] (a number or a traced scalar).

    Returns:
      :class:`DDIMTable` with leading axis ``N``.
    """
    g = grid_curves(process, grid).steps
    one_m = -jnp.expm1(-2.0 * jnp.where(g.finite, g.h, jnp.inf))  # 1 - e^{-2h}
    c = eta * g.sigma_t * jnp.sqrt(one_m)
    keep = g.sigma_t * jnp.sqrt(jnp.maximum(1.0 - eta**2 * one_m, 0.0))
    return DDIMTable(g.alpha_t, keep, c)


def ddim_coefficients(log_alpha_s, log_sigma_s, log_alpha_t, log_sigma_t):
    """``(A, B)`` of the deterministic DDIM step ``s -> t`` in either direction, written
    in ``x`` and ``eps``: ``x_t = A x_s + B eps(x_s)`` with ``A = alpha_t / alpha_s`` and
    ``B = sigma_t - alpha_t sigma_s / alpha_s = -sigma_t (e^h - 1)``, ``h = lambda_t -
    lambda_s`` (the table's eta = 0 step with ``x0 = (x_s - sigma_s eps) / alpha_s``
    substituted, without its cancellation). Affine in ``x_s``, so exactly invertible
    (EDICT, BDIA)."""
    g = geometry_from(log_alpha_s, log_sigma_s, log_alpha_t, log_sigma_t)
    return jnp.exp(g.log_alpha_t - g.log_alpha_s), -g.sigma_t * jnp.expm1(g.h)


@dataclasses.dataclass(frozen=True)
class DDIM(Solver):
    """DDIM with stochasticity ``eta`` in [0, 1] (``eta > 0`` needs a PRNG key); the
    guidance options ``cfgpp`` and ``guidance_memory`` are described in the module."""

    eta: float = 0.0
    cfgpp: bool = False
    guidance_memory: bool = False

    order = 1
    padded_tables = True  # every row reads its own step s -> t only

    @property
    def supports_adjoint(self) -> bool:
        return self.eta == 0.0  # DDPM-like noise needs the forward noise backward

    def __post_init__(self):
        if not 0.0 <= float(self.eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        object.__setattr__(self, "eta", float(self.eta))
        for k in ("cfgpp", "guidance_memory"):
            if not isinstance(getattr(self, k), bool):
                raise TypeError(f"{k} must be True or False, got {getattr(self, k)!r}")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0.0

    @property
    def name(self) -> str:
        flags = {k: True for k in ("cfgpp", "guidance_memory") if getattr(self, k)}
        base = {0.0: "ddim", 1.0: "ddpm"}.get(self.eta)
        return settings_name(base, **flags) if base else settings_name("ddim", eta=self.eta, **flags)

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        del nfe
        check_key(self, key)
        hist = int(self.guidance_memory)  # the guidance wrapper's memory, when carried
        state = empty_state(x_T, grid, hist_size=hist, key=key if self.stochastic else None, process=process)
        return state._replace(aux=ddim_table(process, state.grid, self.eta))

    def transition(self, denoiser, state, cond=None):
        """The step as a Gaussian ``x_next ~ N(mean, std^2 I)``: returns ``(state, std)``
        with ``state.x`` the mean ``alpha_t x0 + sqrt(sigma_t^2 - c^2) eps`` and ``std = c``
        (0 for ``eta = 0``). :meth:`step` adds ``std * z`` to that mean."""
        x = state.x
        c = row(state.aux, state.i)
        t = state.grid[state.i]
        pred, eps, hist = guided_evaluate(self, denoiser, state, t, cond)
        mean = c.a * pred.x0 + c.keep * eps
        std = c.c if self.stochastic else jnp.zeros_like(c.c)
        nfe = state.nfe + network_calls(denoiser, t)
        return state._replace(x=mean.astype(x.dtype), i=state.i + 1, pred=pred, hist=hist, nfe=nfe), std

    def step(self, denoiser, state, cond=None):
        new, std = self.transition(denoiser, state, cond)
        if self.stochastic:
            new = new._replace(x=(new.x + std * step_noise(state)).astype(state.x.dtype))
        return new


def ddim(eta: float = 0.0, *, cfgpp: bool = False, guidance_memory: bool = False) -> DDIM:
    """DDIM with stochasticity ``eta`` in [0, 1] (``eta > 0`` needs a PRNG key).

    Args:
      eta: 0 is deterministic DDIM, 1 is DDPM.
      cfgpp: CFG++ (Chung et al., 2024): renoise with the guidance wrapper's unguided
        noise prediction (see the module docstring).
      guidance_memory: carry the guidance wrapper's state across steps (APG momentum).

    Raises:
      ValueError: ``eta`` outside [0, 1]. TypeError: a flag that is not a bool.
    """
    return DDIM(eta, cfgpp, guidance_memory)


def ddpm(*, cfgpp: bool = False, guidance_memory: bool = False) -> DDIM:
    """DDPM ancestral sampling (Ho et al., NeurIPS 2020): DDIM with ``eta = 1``."""
    return DDIM(1.0, cfgpp, guidance_memory)
