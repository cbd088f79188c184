"""Consistency models: distillation (CD, SCott), improved training (iCT), easy consistency
tuning (ECT) and multistep consistency sampling, for any jdiff process.

A consistency function maps every point ``(x_t, t)`` of a probability-flow ODE
trajectory to the trajectory's point at the anchor time ``t_min``; it is the ODE's flow
map to ``t_min`` and satisfies the boundary condition ``f(x, t_min) = x``. The student
network (the teacher's architecture) gives an x0 prediction ``D(x, t)`` (its own output
converted as a :class:`jdiff.Denoiser` does), and the student is Song et al.'s
skip/out parameterization of it (:func:`boundary_coefficients`).

Everything is written in the process's EDM variables ``xbar = x / alpha`` and ``rho =
sigma / alpha`` (in which every jdiff process is the EDM process), so the same code serves
VP, VE and flow processes; noise levels of the papers (``sigma``, ``t``) are ``rho`` here.

References:
  Song, Dhariwal, Chen & Sutskever, "Consistency Models", ICML 2023 (CM).
  Song & Dhariwal, "Improved Techniques for Training Consistency Models", ICLR 2024 (iCT).
  Geng, Pokle, Luo, Lin & Kolter, "Consistency Models Made Easy", 2024 (ECT).
  Liu et al., "SCott: Accelerating Diffusion Models with Stochastic Consistency
    Distillation", 2024 (the teacher's stochastic solver step).
  Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based
    Generative Models", NeurIPS 2022 (Eq. 5 discretization, Eq. 7 preconditioning).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jdiff._param import Denoiser, broadcast_to_x, model_time, to_x0_eps
from jdiff._sample import sample
from jdiff.distill._teacher import DistillError
from jdiff.solvers import get as get_solver
from jdiff.solvers._base import Solver, check_key, empty_state, evaluate, network_calls, row, step_noise
from jdiff.solvers.ddim import ddim
from jdiff.solvers.dpm_solver import dpm_solver_pp

__all__ = [
    "boundary_coefficients",
    "consistency_function",
    "karras_rhos",
    "times_of_rhos",
    "l2_distance",
    "pseudo_huber",
    "teacher_solver",
    "teacher_step",
    "cd_loss",
    "ict_num_scales",
    "ict_index_probs",
    "ict_loss",
    "ect_r",
    "ect_loss",
    "ConsistencySampler",
    "consistency_sampler",
    "consistency_times",
    "consistency_sample",
]

_C_DRAW, _C_NOISE = 0x43440, 0x43441  # fold_in constants of a sample's index/time and noise


# ------------------------------------------------------------- parameterization


def _fl(x):
    return jnp.asarray(x, jnp.result_type(float))  # float32, or float64 under enable_x64


def _rho_min(process, t_min):
    t_min = process.t_min if t_min is None else t_min
    return t_min, process.rho(_fl(t_min))


def boundary_coefficients(process, t, t_min=None, sigma_data: float = 0.5):
    """``(c_x, c_d)`` with ``f(x, t) = c_x(t) x + c_d(t) D(x, t)`` for an x0 prediction ``D``.

    CM's parameterization (Song et al. 2023, Eq. 5, with Appendix C's coefficients)
    ``f = c_skip xbar + c_out F``, ``c_skip = sd^2 / ((rho - rho_min)^2 + sd^2)``,
    ``c_out = sd (rho - rho_min) / sqrt(sd^2 + rho^2)``, where ``F`` is the raw output of
    an EDM-preconditioned network (Karras et al. 2022, Eq. 7): ``D = c_skip^EDM xbar +
    c_out^EDM F``. Substituting ``F`` (``c_out / c_out^EDM = 1 - rho_min / rho``) and
    going back to ``x`` at the anchor (``x_min = alpha_min xbar_min``)::

        c_x = (alpha_min / alpha) (c_skip - (1 - rho_min/rho) c_skip^EDM),
        c_d = alpha_min (1 - rho_min / rho),      c_skip^EDM = sd^2 / (rho^2 + sd^2).

    At ``t = t_min`` it is exactly ``(1, 0)`` (selected by the time, not left to the
    rounding of ``rho``): ``f(x, t_min) = x`` bit for bit. It is
    finite where ``alpha = 0`` (a flow's ``t = 1``: ``(0, alpha_min)``) and with the anchor
    at the data (``rho_min = 0``: ``f = D``).

    Args:
      process: the process; t: times (any shape); t_min: the anchor (default
        ``process.t_min``); sigma_data: ``sd``, the data's standard deviation.
    """
    t_min, rho_min = _rho_min(process, t_min)
    t = jnp.asarray(t, jnp.result_type(jnp.asarray(t).dtype, jnp.float32))
    rho, a = process.rho(t), process.alpha(t)
    a_min = process.alpha(jnp.asarray(t_min, t.dtype))
    sd2 = sigma_data**2
    # at the anchor exactly (1, 0): rho(t) and rho(t_min), computed by two code paths,
    # need not round alike under jit, so the anchor is selected by its time
    at = t <= jnp.asarray(t_min, t.dtype)
    r = jnp.where(at, 0.0, rho - rho_min.astype(t.dtype))
    c_skip = sd2 / (r * r + sd2)  # 0 at rho = inf
    edm_skip = sd2 / (rho * rho + sd2)
    ratio = jnp.where(at, 0.0, 1.0 - rho_min.astype(t.dtype) / rho)  # c_out / c_out^EDM
    scale = jnp.where(at, 1.0, a_min / jnp.where(a > 0, a, 1.0))  # alpha_min / alpha, finite at alpha = 0
    return scale * (c_skip - ratio * edm_skip), a_min * ratio


def consistency_function(apply: Callable, process, prediction: str, time_input="t", *, t_min=None, sigma_data=0.5):
    """The student as a consistency function ``f(params, x, t, cond=None, key=None)``.

    Args:
      apply: the network, ``apply(params, x, t_in, cond, key=None)`` in ``prediction``'s
        parameterization with ``time_input`` (as :class:`jdiff.Denoiser`).
      process, prediction, time_input: as the teacher's; t_min, sigma_data: see
        :func:`boundary_coefficients`.

    Returns:
      ``f`` with ``f(params, x, t)`` (``t`` scalar or ``(B,)`` process times) the point at
      ``t_min`` of the trajectory through ``x`` (:func:`boundary_coefficients`); ``f.t_min``
      is the anchor.
    """
    t_min = process.t_min if t_min is None else float(t_min)

    def f(params, x, t, cond=None, key=None):
        dt = jnp.result_type(x.dtype, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, dt), (x.shape[0],))
        out = apply(params, x, model_time(process, time_input, t), cond, key)
        x0 = to_x0_eps(prediction, out.astype(dt), x.astype(dt), t, process).x0
        cx, cd = boundary_coefficients(process, t, t_min, sigma_data)
        return (broadcast_to_x(cx, x) * x.astype(dt) + broadcast_to_x(cd, x) * x0).astype(x.dtype)

    f.t_min = t_min
    f.process = process
    return f


# ------------------------------------------------------------- discretization


def karras_rhos(process, n, *, t_min=None, rho_max: float = 80.0, rho: float = 7.0):
    """The ``n`` noise levels of Karras et al. (2022, Eq. 5) used by CM and iCT,
    increasing: ``rho_i = (rho_min^(1/rho) + i / (n - 1) (rho_top^(1/rho) -
    rho_min^(1/rho)))^rho``, ``rho_min = rho(t_min)``, ``rho_top = min(rho_max,
    rho(t_max))``; ``n`` a Python int."""
    _, lo = _rho_min(process, t_min)
    top = jnp.minimum(rho_max, process.rho(_fl(process.t_max)))
    i = jnp.arange(n, dtype=jnp.result_type(float))
    a, b = lo ** (1.0 / rho), top ** (1.0 / rho)
    return (a + i / (n - 1) * (b - a)) ** rho


def times_of_rhos(process, rhos, *, t_min=None, rho_max: float = 80.0):
    """Process times of noise levels ``rhos`` (clipped to ``[rho(t_min), rho_top]``): the
    anchor exactly ``t_min`` and the top level exactly ``t_max`` (for a flow, whose
    ``rho(t_max)`` is infinite, ``rho_top = rho_max`` stands for ``t_max``)."""
    t_min, lo = _rho_min(process, t_min)
    top = jnp.minimum(rho_max, process.rho(_fl(process.t_max)))
    t = process.t_of_rho(jnp.clip(rhos, lo, top)).astype(jnp.result_type(float))
    t = jnp.where(rhos <= lo * (1 + 1e-5), t_min, t)  # the ends up to float rounding of karras_rhos
    return jnp.where(rhos >= top * (1 - 1e-5), process.t_max, t)


# ------------------------------------------------------------------- distances


def l2_distance(a, b):
    """Per-sample mean squared difference ``mean_features (a - b)^2`` (CM's squared L2
    distance, normalized by the dimension)."""
    d = (a - b).reshape(a.shape[0], -1)
    return jnp.mean(d * d, axis=1)


def pseudo_huber(a, b, c=None):
    """Per-sample pseudo-Huber distance ``sqrt(||a - b||^2 + c^2) - c`` (iCT, Song &
    Dhariwal 2023, "pseudo-Huber metric"), ``c = 0.00054 sqrt(d)`` by default (``d`` features)."""
    d = (a - b).reshape(a.shape[0], -1)
    if c is None:
        c = 0.00054 * math.sqrt(d.shape[1])
    return jnp.sqrt(jnp.sum(d * d, axis=1) + c * c) - c


_DISTANCES = {"l2": l2_distance, "pseudo_huber": pseudo_huber}


def _distance(name):
    if name not in _DISTANCES:
        raise DistillError(f"distance {name!r}: expected one of {sorted(_DISTANCES)}")
    return _DISTANCES[name]


# ---------------------------------------------------------------- teacher step


def teacher_solver(name: str = "ddim", eta: float = 0.3) -> Solver:
    """The solver of the teacher's step: ``"ddim"``, ``"dpm++"`` (singlestep
    DPM-Solver++(2S), two calls), ``"scott"`` (SCott's stochastic step, here DDIM with
    ``eta``: ancestral noise of scale ``eta``) or any :func:`jdiff.solvers.get` name."""
    if name == "ddim":
        return ddim()
    if name == "dpm++":
        return dpm_solver_pp(2, method="singlestep", lower_order_final=False)
    if name == "scott":
        if not 0.0 < eta <= 1.0:
            raise DistillError(f"scott: eta must be in (0, 1], got {eta}")
        return ddim(eta)
    try:
        return get_solver(name)
    except (ValueError, KeyError) as e:
        raise DistillError(f"teacher solver {name!r}: {e}") from None


def teacher_step(solver: Solver, denoiser, x, t_from, t_to, cond=None, keys=None):
    """One step of ``solver`` from ``t_from`` to ``t_to`` (per-sample ``(B,)`` times),
    each sample on its own two-point grid (``solver.init`` + ``solver.step`` under
    ``vmap``): the teacher's ODE (or, stochastic, SDE) step of CD (CM Eq. 6).

    Args:
      keys: ``(B,)`` per-sample keys, needed by a stochastic solver.
    """
    process = denoiser.process
    if solver.stochastic and keys is None:
        raise DistillError(f"teacher solver {solver.name} is stochastic: it needs keys")

    def one(xi, a, b, ci, ki):
        st = solver.init(xi[None], jnp.stack([a, b]), process, key=ki if solver.stochastic else None)
        st = solver.step(denoiser, st, None if ci is None else ci[None])
        return st.x[0].astype(x.dtype)

    ks = keys if solver.stochastic else None
    return jax.vmap(one)(x, t_from, t_to, cond, ks)


# ----------------------------------------------------------------------- draws


@functools.partial(jax.jit, static_argnums=1)
def draws(keys, shape):
    """Each sample's ``(u, z)``: a uniform in ``[0, 1)`` (its index or time) and a
    standard normal of one sample's shape, from ``fold_in(key_i, c)`` (the losses' only
    randomness; a test redraws them with this function)."""
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _C_DRAW), ()))(keys)
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _C_NOISE), tuple(shape[1:])))(keys)
    return u, z


def _noised(process, x0, z, t):
    return broadcast_to_x(process.alpha(t), x0) * x0 + broadcast_to_x(process.sigma(t), x0) * z


def _cond(batch):
    return batch.get("label") if isinstance(batch, dict) else None


# ------------------------------------------------------------------------ CD


def cd_loss(
    f, teacher_denoiser: Callable, *, solver: Solver | None = None, num_scales: int = 18, distance="l2", rho_max=80.0
):
    """Consistency distillation (CM, Sec. 4, Eq. 7 with ``lambda = 1``):

        L = d(f_theta(x_{t_{n+1}}, t_{n+1}), f_ema(x_hat_{t_n}, t_n)),
        x_{t_{n+1}} = alpha x0 + sigma z,   x_hat_{t_n} = teacher step (t_{n+1} -> t_n),

    ``n`` uniform in ``0..N-2`` over :func:`karras_rhos`'s ``N = num_scales`` levels and
    ``f_ema`` the EMA of the student (the train state's EMA, passed as ``ema=``; without
    one, ``stop_gradient(params)``).

    Args:
      f: the student (:func:`consistency_function`).
      teacher_denoiser: ``frozen -> denoiser`` (a :class:`jdiff.Denoiser` or anything
        the solvers accept), called with the loss's ``frozen``.
      solver: the teacher's step (:func:`teacher_solver`; default DDIM).
      distance: ``"l2"`` or ``"pseudo_huber"`` (or a function ``(a, b) -> (B,)``).

    Returns:
      ``loss_fn(params, batch, keys, *, frozen=None, ema=None)`` with ``reads_ema``.
    """
    solver = ddim() if solver is None else solver
    dist = distance if callable(distance) else _distance(distance)
    if int(num_scales) < 2:
        raise DistillError(f"num_scales must be at least 2, got {num_scales}")
    process, t_min = f.process, f.t_min
    ts = times_of_rhos(
        process, karras_rhos(process, num_scales, t_min=t_min, rho_max=rho_max), t_min=t_min, rho_max=rho_max
    )

    def loss_fn(params, batch, keys, *, frozen=None, ema=None):
        x0 = jnp.asarray(batch["x"])
        cond = _cond(batch)
        u, z = draws(keys, x0.shape)
        n = jnp.minimum(jnp.floor(u * (num_scales - 1)).astype(jnp.int32), num_scales - 2)
        t_hi, t_lo = ts[n + 1], ts[n]
        x_hi = _noised(process, x0, z, t_hi)
        skeys = jax.vmap(lambda k: jax.random.fold_in(k, 7))(keys)
        x_lo = jax.lax.stop_gradient(teacher_step(solver, teacher_denoiser(frozen), x_hi, t_hi, t_lo, cond, skeys))
        target_params = params if ema is None else ema
        target = jax.lax.stop_gradient(f(target_params, x_lo, t_lo, cond))
        d = dist(f(params, x_hi, t_hi, cond), target)
        loss = jnp.mean(d)
        return loss, {"loss": loss}

    loss_fn.reads_ema = True
    return loss_fn


# ----------------------------------------------------------------------- iCT


def ict_num_scales(step, total_steps: int, s0: int = 10, s1: int = 1280):
    """iCT's discretization curriculum (Song & Dhariwal 2023, the "exponential" curriculum):
    ``N(k) = min(s0 2^floor(k / K'), s1) + 1``, ``K' = floor(K / (log2(s1 / s0) + 1))``."""
    kp = max(1, int(total_steps // (math.log2(s1 / s0) + 1)))
    e = jnp.floor(jnp.asarray(step, jnp.float32) / kp)
    return (jnp.minimum(s0 * 2.0**e, s1) + 1).astype(jnp.int32)


def ict_index_probs(rhos, n, p_mean: float = -1.1, p_std: float = 2.0):
    """iCT's log-normal distribution over the pairs ``(i, i + 1)`` of the first ``n``
    levels of ``rhos`` (Song & Dhariwal 2023, the log-normal schedule): ``p(i) ~ erf((ln rho_{i+1} -
    P_mean) / (sqrt 2 P_std)) - erf((ln rho_i - P_mean) / (sqrt 2 P_std))``; 0 for
    ``i >= n - 1``. ``n`` may be traced."""
    e = jax.lax.erf((jnp.log(rhos) - p_mean) / (math.sqrt(2.0) * p_std))
    p = e[1:] - e[:-1]
    p = jnp.where(jnp.arange(p.shape[0]) < n - 1, p, 0.0)
    return p / jnp.sum(p)


def _levels(process, n, n_max, t_min, rho_max, rho=7.0):
    """Karras levels for a traced ``n``, as a fixed ``(n_max,)`` array (entries past
    ``n - 1`` are the top level)."""
    _, lo = _rho_min(process, t_min)
    top = jnp.minimum(rho_max, process.rho(_fl(process.t_max)))
    i = jnp.minimum(jnp.arange(n_max, dtype=jnp.result_type(float)), n - 1)
    a, b = lo ** (1.0 / rho), top ** (1.0 / rho)
    return (a + i / (n - 1) * (b - a)) ** rho


def ict_loss(f, *, total_steps: int, s0=10, s1=1280, p_mean=-1.1, p_std=2.0, distance="pseudo_huber", rho_max=80.0):
    """Improved consistency training (Song & Dhariwal 2023): no teacher, no EMA target,

        L = lambda(rho_i) d(f_theta(x0 + rho_{i+1} z), stop_gradient f_theta(x0 + rho_i z)),

    (in the process's variables: ``x_t = alpha x0 + sigma z`` with the same ``z``), the
    levels :func:`karras_rhos` with ``N(k)`` from :func:`ict_num_scales` at the training
    step ``k``, ``i`` from :func:`ict_index_probs`, ``lambda = 1 / (rho_{i+1} - rho_i)``
    and the pseudo-Huber distance.

    Returns:
      ``loss_fn(params, batch, keys, *, frozen=None, step=0)`` with ``reads_step``.
    """
    dist = distance if callable(distance) else _distance(distance)
    process, t_min = f.process, f.t_min

    def loss_fn(params, batch, keys, *, frozen=None, step=0):
        del frozen
        x0 = jnp.asarray(batch["x"])
        cond = _cond(batch)
        n = ict_num_scales(step, total_steps, s0, s1)
        rhos = _levels(process, n, s1 + 1, t_min, rho_max)
        cdf = jnp.cumsum(ict_index_probs(rhos, n, p_mean, p_std))
        u, z = draws(keys, x0.shape)
        i = jnp.minimum(jnp.sum(cdf[None, :] <= u[:, None], axis=1), n - 2)
        r_lo, r_hi = rhos[i], rhos[i + 1]
        t_lo = times_of_rhos(process, r_lo, t_min=t_min, rho_max=rho_max)
        t_hi = times_of_rhos(process, r_hi, t_min=t_min, rho_max=rho_max)
        target = jax.lax.stop_gradient(f(params, _noised(process, x0, z, t_lo), t_lo, cond))
        d = dist(f(params, _noised(process, x0, z, t_hi), t_hi, cond), target)
        loss = jnp.mean(d / (r_hi - r_lo))
        return loss, {"loss": loss, "num_scales": n.astype(jnp.float32)}

    loss_fn.reads_step = True
    return loss_fn


# ----------------------------------------------------------------------- ECT


def ect_r(rho_t, step, total_steps: int, *, rho_min, q: float = 2.0, stages: int = 8, k: float = 8.0, b: float = 1.0):
    """ECT's second level ``r`` for level ``t`` at training step ``step`` (Geng et al.
    2024, the mapping function): ``r = t (1 - n(t) / q^a)``, ``n(t) = 1 + k
    sigmoid(-b t)``, ``a = ceil(step / d)`` with ``d = total_steps / stages``: at step 0
    ``r`` is the anchor (denoising), and ``dt = t - r`` shrinks by ``q`` every stage.
    Clipped below at ``rho_min``."""
    d = max(total_steps / stages, 1.0)
    a = jnp.ceil(jnp.asarray(step, jnp.float32) / d)
    r = rho_t * (1.0 - (1.0 + k * jax.nn.sigmoid(-b * rho_t)) / q**a)
    return jnp.maximum(r, rho_min)


def ect_loss(f, *, total_steps: int, q=2.0, stages=8, p_mean=-1.1, p_std=2.0, distance="pseudo_huber", rho_max=80.0):
    """Easy consistency tuning (Geng et al. 2024): continuous-time consistency training
    started from the teacher, ``ln t ~ N(P_mean, P_std^2)`` (``t`` a level ``rho``),
    ``r = ect_r(t, step)``, ``L = d(f(x0 + t z), stop_gradient f(x0 + r z)) / (t - r)``
    (in the process's variables, the same ``z``).

    Returns:
      ``loss_fn(params, batch, keys, *, frozen=None, step=0)`` with ``reads_step``.
    """
    dist = distance if callable(distance) else _distance(distance)
    process, t_min = f.process, f.t_min
    _, lo = _rho_min(process, t_min)
    top = jnp.minimum(rho_max, process.rho(_fl(process.t_max)))

    def loss_fn(params, batch, keys, *, frozen=None, step=0):
        del frozen
        x0 = jnp.asarray(batch["x"])
        cond = _cond(batch)
        u, z = draws(keys, x0.shape)
        g = math.sqrt(2.0) * jax.lax.erf_inv(2.0 * jnp.clip(u, 1e-7, 1 - 1e-7) - 1.0)
        rt = jnp.clip(jnp.exp(p_mean + p_std * g), lo * 1.0001, top)
        rr = ect_r(rt, step, total_steps, rho_min=lo, q=q, stages=stages)
        t_hi = times_of_rhos(process, rt, t_min=t_min, rho_max=rho_max)
        t_lo = times_of_rhos(process, rr, t_min=t_min, rho_max=rho_max)
        target = jax.lax.stop_gradient(f(params, _noised(process, x0, z, t_lo), t_lo, cond))
        d = dist(f(params, _noised(process, x0, z, t_hi), t_hi, cond), target)
        loss = jnp.mean(d / (rt - rr))
        return loss, {"loss": loss}

    loss_fn.reads_step = True
    return loss_fn


# ------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class ConsistencySampler(Solver):
    """Multistep consistency sampling (CM, Algorithm 1) in jdiff's solver protocol.

    The denoiser is the student with its consistency function as the x0 prediction
    (:func:`consistency_sample` builds it). Step ``i`` evaluates ``x_end = f(x, t_i)``
    and re-noises it to ``t_{i+1}`` with the forward process from the grid's end
    ``t_end`` (the anchor): ``x = (alpha_{i+1} / alpha_end) x_end + alpha_{i+1}
    sqrt(rho_{i+1}^2 - rho_end^2) z`` (CM's ``x + sqrt(tau^2 - eps^2) z``); the last step
    lands on ``t_end`` with no noise, so ``N`` intervals cost ``N`` network calls.
    ``transition`` exposes that Gaussian (RLCM's policy).
    """

    order = 1
    stochastic = True
    padded_tables = True
    name = "consistency"

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        del nfe
        check_key(self, key)
        state = empty_state(x_T, grid, key=key, process=process)
        g = state.grid
        nxt, end = g[1:], g[-1]
        a_next = process.alpha(nxt)
        r_end = process.rho(end)
        c = a_next * jnp.sqrt(jnp.maximum(process.rho(nxt) ** 2 - r_end**2, 0.0))
        c = jnp.where(nxt == end, 0.0, c)
        return state._replace(aux=(a_next / process.alpha(end), c))

    def transition(self, denoiser, state, cond=None):
        a, c = row(state.aux, state.i)
        t = state.grid[state.i]
        pred = evaluate(denoiser, state.x, t, cond)
        nfe = state.nfe + network_calls(denoiser, t)
        return state._replace(x=a * pred.x0, i=state.i + 1, pred=pred, nfe=nfe), c

    def step(self, denoiser, state, cond=None):
        new, std = self.transition(denoiser, state, cond)
        return new._replace(x=(new.x + std * step_noise(state)).astype(state.x.dtype))


def consistency_sampler() -> ConsistencySampler:
    """The multistep consistency sampler (:class:`ConsistencySampler`); needs a key."""
    return ConsistencySampler()


def consistency_times(process, steps: int, *, t_min=None, rho_max: float = 80.0):
    """The ``steps + 1``-point grid of :class:`ConsistencySampler`: ``t_max``, then
    ``steps - 1`` levels evenly spaced in ``rho^(1/7)`` (:func:`karras_rhos`), then the
    anchor ``t_min``; decreasing."""
    t_min = process.t_min if t_min is None else float(t_min)
    return _grid(process, int(steps), t_min, float(rho_max))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _grid(process, steps, t_min, rho_max):
    rhos = karras_rhos(process, steps + 1, t_min=t_min, rho_max=rho_max)
    return times_of_rhos(process, rhos, t_min=t_min, rho_max=rho_max)[::-1]


def student_denoiser(f, params) -> Denoiser:
    """The student as a :class:`jdiff.Denoiser` whose x0 prediction is ``f(params, x, t)``."""
    return Denoiser(apply_fn=f, params=params, process=f.process, prediction="x0", time_input="t")


def consistency_sample(f, params, noise, *, steps: int, trained_steps=None, cond=None, key=None, grid=None):
    """Draw from a consistency student with ``steps`` network calls.

    Args:
      f: the student (:func:`consistency_function`); params: its parameters.
      noise: ``(n, ...)`` standard normals (scaled by the prior's standard deviation).
      steps: network calls (1: ``f(x_T, t_max)``); trained_steps: the most the student
        allows (``None``: no limit); grid: a decreasing ``(steps + 1,)`` grid from
        ``t_max`` to ``f.t_min`` (default :func:`consistency_times`).
      key: the re-noising key (default ``key(0)``).

    Raises:
      DistillError: ``steps < 1`` or more than ``trained_steps``.
    """
    if not isinstance(steps, int) or steps < 1:
        raise DistillError(f"a consistency student samples with 1 or more steps, got {steps!r}")
    if trained_steps is not None and steps > trained_steps:
        raise DistillError(f"this student was trained for at most {trained_steps} steps; asked for {steps}")
    process = f.process
    grid = consistency_times(process, steps, t_min=f.t_min) if grid is None else jnp.asarray(grid)
    x_T = jnp.asarray(noise) * process.prior_std()
    key = jax.random.key(0) if key is None else key
    return sample(consistency_sampler(), student_denoiser(f, params), x_T, grid, cond=cond, key=key)
