"""RED-diff: the posterior sampler that optimizes instead of integrating."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jdiff._param import Prediction
from jdiff._random import normal_per_sample
from jdiff.inverse_problems._engine import PosteriorSolver, measurement_of, posterior_sample, sampling_settings
from jdiff.inverse_problems._operators import _check_number
from jdiff.solvers._base import check_key, empty_state, network_calls, settings_name

__all__ = ["REDDiff", "red_diff"]


@dataclasses.dataclass(frozen=True)
class REDDiff(PosteriorSolver):
    """RED-diff as a solver (see :func:`red_diff`): the state ``x`` is ``mu``, Adam's two
    moments ride in ``state.hist`` and its step count is ``state.i``. It cannot take
    another solver's update: a step is an optimizer update of ``mu`` with a noise-weighted
    score term, not a move of ``x_t`` along the diffusion; it runs in :func:`jdiff.sample`'s
    loop, so the gradient strategies reach it."""

    lam: float = 0.25
    lr: float = 0.1
    b1: float = 0.9
    b2: float = 0.99

    who = "red_diff"
    default_nfe = 1000
    stochastic = True
    order = 1

    def __post_init__(self):
        object.__setattr__(self, "lam", _check_number("red_diff: lam", self.lam, lo=0))
        object.__setattr__(self, "lr", _check_number("red_diff: lr", self.lr, lo=0, lo_open=True))
        b1 = _check_number("red_diff: b1", self.b1, lo=0, hi=1)
        b2 = _check_number("red_diff: b2", self.b2, lo=0, hi=1)
        if b1 >= 1 or b2 >= 1:
            raise ValueError(f"red_diff: b1 and b2 must be < 1, got {b1}, {b2}")
        object.__setattr__(self, "b1", b1)
        object.__setattr__(self, "b2", b2)

    @property
    def name(self):
        return settings_name("red_diff", lam=self.lam, lr=self.lr, b1=self.b1, b2=self.b2)

    def start(self, m, grid, key, shape, dtype):
        """``mu``'s start: ``A^+ y`` for a linear operator, else zeros."""
        return m.operator.pinv(m.y) if m.operator.linear else jnp.zeros(shape, m.y.dtype)

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        check_key(self, key)
        state = empty_state(x_T, grid, hist_size=2, key=key, process=process)
        dt = state.x.dtype
        return state._replace(aux=(process.alpha(state.grid).astype(dt), process.sigma(state.grid).astype(dt)))

    def step(self, denoiser, state, cond=None):
        m = measurement_of(denoiser)
        mu, i, (a, s) = state.x, state.i, state.aux
        dt = mu.dtype
        opt = optax.adam(self.lr, b1=self.b1, b2=self.b2)
        # optax's Adam state from the carried moments and step count
        treedef = jax.tree.structure(jax.eval_shape(opt.init, mu))
        opt_state = jax.tree.unflatten(treedef, [i, state.hist[0], state.hist[1]])

        def data_loss(mu):
            r = m.y - m.operator.A(mu)
            return 0.5 * jnp.sum(r * r)

        z = normal_per_sample(state.key, mu.shape, dt, step=i)
        t = state.grid[i]
        p = denoiser(a[i] * mu + s[i] * z, t, cond)
        reg = jax.lax.stop_gradient(p.eps.astype(dt) - z)
        grad = jax.grad(data_loss)(mu) + self.lam * (s[i] / a[i]) * reg
        upd, opt_state = opt.update(grad, opt_state, mu)
        count, m1, m2 = jax.tree.leaves(opt_state)
        del count  # = i + 1, the next state's i
        pred = Prediction(p.x0.astype(dt), p.eps.astype(dt))
        nfe = state.nfe + network_calls(denoiser, t)
        return state._replace(x=optax.apply_updates(mu, upd), i=i + 1, pred=pred, hist=jnp.stack([m1, m2]), nfe=nfe)


def red_diff(
    denoiser,
    operator,
    y,
    sigma_y,
    key,
    *,
    lam: float = 0.25,
    lr: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_init=None,
    **sampling,
):
    """Regularization by denoising diffusion (Mardani, Song, Kautz & Vahdat, "A Variational
    Perspective on Solving Inverse Problems with Diffusion Models", ICLR 2024, Eq. 13 and
    Algorithm 1).

    Fits ``q(x0) = N(mu, 0)`` by Adam (optax) on
    ``||y - A(mu)||^2 / 2 + lam * (sigma_t / alpha_t) * <sg(eps_hat(x_t, t) - eps), mu>``
    with ``x_t = alpha_t mu + sigma_t eps``, one fresh ``eps`` per step and ``t`` walking the
    grid from noise to data (the paper's descending schedule and ``sqrt(1/SNR)`` weights).
    ``sigma_y`` is validated but, as in the paper's code, the data term has unit weight:
    ``lam`` sets the balance (Adam is invariant to the overall scale). ``mu`` starts at
    ``A^+ y`` for linear operators (zeros otherwise) unless ``mu_init`` is given. Every term
    is per sample and Adam is elementwise, so samples are independent. The update is an
    optimizer's (see :class:`REDDiff` for why no other solver's update can take its place).

    NFE: one denoiser call per step, **no VJP through the denoiser** (the regularizer's
    gradient is the stopped ``eps_hat - eps``; only ``A`` is differentiated). Usual NFE:
    1000 (paper).

    Args:
      denoiser, operator, y, sigma_y, key: as in :func:`posterior_sample`.
      lam: regularization weight (finite, >= 0); lr, b1, b2: Adam's settings.
      mu_init: optional ``(B, *x_shape)`` starting point of ``mu`` (the ``x_T`` of :class:`Sampling`).
      **sampling: the shared keywords of :class:`Sampling` (``nfe`` default 1000).

    Returns:
      ``(B, *x_shape)`` the final ``mu`` (and the info; its grid's first N points are the
      times used).

    Raises:
      ValueError: as :func:`dps`, and ``lr`` not positive or ``b1``/``b2`` outside [0, 1).
    """
    run = REDDiff(lam, lr, b1, b2)
    if mu_init is not None:
        sampling = {**sampling, "x_T": mu_init}
    return posterior_sample(run, denoiser, operator, y, sigma_y, key, sampling_settings("red_diff", sampling))
