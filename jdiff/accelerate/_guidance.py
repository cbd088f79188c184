"""Adaptive guidance: classifier-free guidance that drops the unconditional branch once
the two predictions agree (Castillo et al., "Adaptive Guidance: Training-free
Acceleration of Conditional Diffusion Models", 2023).

Castillo et al. observe that along a guided trajectory the conditional and
unconditional noise predictions become nearly parallel after the first steps: their
cosine similarity (Sec. 4, Eq. 6)

    gamma_i = <eps_c(x_i, t_i), eps_u(x_i, t_i)> / (|eps_c| |eps_u|)

rises toward 1, and once it passes a threshold ``gamma_bar`` the guided update is almost
the conditional one, so the unconditional call can be dropped for the rest of the
trajectory (their Adaptive Guidance policy, Sec. 4.1): the steps after the switch cost
one network call instead of two.

Two forms. :func:`adaptive_guidance` keeps the program static: it calibrates the switch on a few
trajectories (the time after which the similarity stays above ``gamma``) and returns
the same guidance wrapper with a guidance interval ending at that time (the interval
machinery of :func:`jdiff.wrappers.guidance`: outside it a ``lax.cond`` makes only the
conditional call, and :attr:`jdiff.SampleInfo.nfe` counts one call per evaluation).
:func:`adaptive_solver` decides per batch while sampling, as the paper does: a solver
wrapper carries a "dropped" flag in its state; while it is down each step makes the
guided pair of calls and measures the similarity (the smallest over the batch), and once
that reaches ``gamma`` the flag stays up and every later step makes the conditional call
alone (a ``lax.cond``, so the skipped call is not run).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._param import Prediction, TreeValue
from jdiff._sample import _CastInput, sample
from jdiff.solvers._base import Solver, network_calls
from jdiff.wrappers._scale import _scale_at

__all__ = [
    "guidance_similarity",
    "switch_step",
    "AdaptiveGuidance",
    "adaptive_guidance",
    "AdaptiveGuidanceSolver",
    "adaptive_solver",
]

_REDUCE = ("min", "mean")


def _check_cfg(guided):
    if getattr(guided, "kind", None) != "cfg" or not hasattr(guided, "null_cond"):
        raise TypeError(
            "adaptive guidance needs a classifier-free guidance wrapper (jdiff.wrappers.guidance), "
            f"got {type(guided).__name__}"
        )


def _cosine(a, b):
    """Per-sample cosine similarity over the non-batch axes (0 where either is 0)."""
    axes = tuple(range(1, a.ndim))
    dot = jnp.sum(a * b, axis=axes)
    na = jnp.sqrt(jnp.sum(a * a, axis=axes))
    nb = jnp.sqrt(jnp.sum(b * b, axis=axes))
    den = na * nb
    return jnp.where(den > 0, dot / jnp.where(den > 0, den, 1.0), 0.0)


def _null_like(cond, null):
    def one(c, n):
        c = jnp.asarray(c)
        return jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)

    return jax.tree.map(one, cond, null)


_ON = ("eps", "x0")


def _check_on(on):
    if on not in _ON:
        raise ValueError(f"on must be one of {_ON} (the predictions compared), got {on!r}")
    return on


def _agreement(pc, pu, on):
    """Per-sample cosine similarity of the conditional and unconditional predictions."""
    a, b = (pc.eps, pu.eps) if on == "eps" else (pc.x0, pu.x0)
    return _cosine(a.astype(jnp.float32), b.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("on",))
def _similarities(inner, null, xs, grid, cond, on):
    """Cosine similarity of the pair at ``(xs[i], grid[i])`` for every step i."""
    uncond = _null_like(cond, null)

    def at(args):
        x, t = args
        return _agreement(inner(x, t, cond), inner(x, t, uncond), on)

    return jax.lax.map(at, (xs, grid))


def guidance_similarity(solver, guided, x_T, grid=None, *, cond, nfe=None, on: str = "eps"):
    """The cosine similarity of the conditional and unconditional eps predictions along
    guided trajectories (Castillo et al. 2023, Eq. 6).

    Samples with ``solver`` and ``guided`` from ``x_T`` (recording the trajectory), then
    evaluates both predictions at the start of every step: ``(x_i, t_i)``, the point a
    one-call-per-step solver evaluates (a multi-evaluation solver's first evaluation).

    Args:
      solver: a deterministic solver.
      guided: a classifier-free guidance wrapper (:func:`jdiff.wrappers.guidance`).
      x_T: ``(B, ...)`` the calibration noises.
      grid, nfe: as in :func:`jdiff.sample`.
      cond: the conditioning of the calibration samples (batch ``B``).
      on: the predictions compared: ``"eps"`` (the paper's noise predictions) or
        ``"x0"``. At high noise both eps predictions are close to ``x_t / sigma`` and
        agree whatever the class (similarity ~1 on the digits model, falling toward the
        data); the x0 predictions agree only once the class is decided.

    Returns:
      ``(N, B)`` float32 NumPy array: row ``i`` is step ``i``'s similarity per sample.

    Raises:
      TypeError: ``guided`` is not a classifier-free guidance wrapper.
      ValueError: a stochastic solver, or what :func:`jdiff.sample` refuses.
    """
    return _calibrate(solver, guided, x_T, grid, cond, nfe, _check_on(on))[0]


def _calibrate(solver, guided, x_T, grid, cond, nfe, on):
    """``(similarity, grid)`` of :func:`guidance_similarity` (the grid as NumPy)."""
    _check_cfg(guided)
    if solver.stochastic:
        raise ValueError(f"guidance_similarity calibrates a deterministic sampler; {solver.name} is stochastic")
    _, info = sample(solver, guided, x_T, grid, cond=cond, nfe=nfe, return_info=True, trajectory=True)
    xs = info.xs[:-1].astype(jnp.asarray(x_T).dtype)
    sim = _similarities(guided.inner, guided.null_cond, xs, info.grid[:-1], cond, on)
    return np.asarray(sim), np.asarray(info.grid)


def switch_step(similarity, gamma: float, reduce: str = "min") -> int:
    """The first step from which the similarity stays at or above ``gamma``.

    Args:
      similarity: ``(N, B)`` (or ``(N,)``) per-step similarities
        (:func:`guidance_similarity`).
      gamma: the threshold ``gamma_bar`` (Castillo et al. use values near 0.99);
        1 or more is never reached (by definition: rounding can make nearly
        parallel predictions read exactly 1).
      reduce: how the calibration samples are combined per step: ``"min"`` (every
        sample must agree: conservative) or ``"mean"``.

    Returns:
      ``k`` in ``0..N``: the steps ``k..N-1`` may drop the unconditional call; ``N``
      when the last step is below ``gamma`` (never switch).

    Raises:
      ValueError: a NaN ``gamma``, an unknown ``reduce`` or a similarity that is not
        1-D or 2-D.
    """
    gamma = _check_gamma(gamma)
    if reduce not in _REDUCE:
        raise ValueError(f"reduce must be one of {_REDUCE}, got {reduce!r}")
    s = np.asarray(similarity, np.float64)
    if s.ndim == 2:
        s = s.min(axis=1) if reduce == "min" else s.mean(axis=1)
    if s.ndim != 1:
        raise ValueError(f"similarity must be (N,) or (N, B), got shape {s.shape}")
    ok = s >= gamma if gamma < 1.0 else np.zeros(s.shape, bool)
    # trailing run of True: the first index from which every step agrees
    k = s.shape[0]
    while k > 0 and ok[k - 1]:
        k -= 1
    return int(k)


class AdaptiveGuidance(NamedTuple):
    """What :func:`adaptive_guidance` returns.

    Attributes:
      denoiser: the guidance wrapper to sample with: guided before ``time``, the
        conditional call alone at and after it (the input wrapper itself when the
        threshold is never reached).
      step: the calibrated switch step ``k`` (``N``: never).
      time: the switching time ``grid[k]`` (``-inf`` when never).
      similarity: the ``(N, B)`` calibration similarities.
    """

    denoiser: Any
    step: int
    time: float
    similarity: np.ndarray


def adaptive_guidance(
    solver, guided, x_T, grid=None, *, cond, gamma: float, nfe=None, reduce: str = "min", on: str = "eps"
):
    """Adaptive guidance with a calibrated static schedule (Castillo et al. 2023, Sec. 4.1
    with the switch fixed offline).

    Runs the guided sampler on the calibration batch ``x_T``/``cond``, measures the
    cosine similarity of eps_c and eps_u at every step (:func:`guidance_similarity`),
    finds the step ``k`` from which it stays at or above ``gamma`` (:func:`switch_step`),
    and returns ``guided`` restricted to the times above ``grid[k]`` by a guidance
    interval on ``t``: steps ``0..k-1`` make the batched conditional and unconditional
    call (2 network calls), steps ``k..N-1`` the conditional call alone (1). A sampler
    with one call per step then spends ``2k + (N - k)`` calls instead of ``2N``.

    Use the returned denoiser with the same solver and grid (the schedule is a time; on
    another grid of the same range it switches at the same noise level).

    Args:
      solver: a deterministic solver.
      guided: a classifier-free guidance wrapper (:func:`jdiff.wrappers.guidance`)
        without a guidance interval.
      x_T: ``(B, ...)`` calibration noises.
      grid, nfe: as in :func:`jdiff.sample`.
      cond: the calibration conditioning.
      gamma: the similarity threshold; 1 or more is never reached (by definition), and
        then the result is ``guided`` itself: the plain CFG sampler, bit for bit.
      reduce: ``"min"`` or ``"mean"`` over the calibration samples (:func:`switch_step`).
      on: ``"eps"`` or ``"x0"``: the predictions compared (:func:`guidance_similarity`).

    Returns:
      An :class:`AdaptiveGuidance`.

    Raises:
      TypeError: ``guided`` is not a classifier-free guidance wrapper.
      ValueError: ``guided`` already has a guidance interval; a stochastic solver; bad
        ``gamma``/``reduce``; what :func:`jdiff.sample` refuses.
    """
    _check_cfg(guided)
    if guided.interval is not None:
        raise ValueError("adaptive_guidance sets the guidance interval itself; pass a wrapper without interval=")
    switch_step(np.zeros(1), gamma, reduce)  # validate before sampling
    sim, g = _calibrate(solver, guided, x_T, grid, cond, nfe, _check_on(on))
    k = switch_step(sim, gamma, reduce)
    N = sim.shape[0]
    if k == N:
        return AdaptiveGuidance(guided, N, -math.inf, sim)
    time = float(np.float32(g[k]))
    if time < 0:
        raise ValueError(f"adaptive_guidance needs grid times >= 0 (a guidance interval on t), got {time}")
    den = dataclasses.replace(guided, interval=(time, math.inf), interval_on="t")
    return AdaptiveGuidance(den, k, time, sim)


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"gamma must be a number (a cosine similarity threshold), got {gamma!r}")
    if math.isnan(float(gamma)):
        raise ValueError("gamma is NaN")
    return float(gamma)


@dataclasses.dataclass(frozen=True, eq=False)
class _Given(TreeValue):
    """A denoiser that returns a prediction already made (the adaptive step's) for the
    one evaluation a one-call-per-step solver makes, and reports its network calls."""

    pred: Any
    n_calls: Any
    process: Any

    def calls(self, t):
        return self.n_calls

    def __call__(self, x, t, cond=None) -> Prediction:
        return Prediction(self.pred.x0.astype(x.dtype), self.pred.eps.astype(x.dtype))


jax.tree_util.register_dataclass(_Given, data_fields=["pred", "n_calls", "process"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class AdaptiveGuidanceSolver(Solver):
    """A one-call-per-step solver whose guidance drops the unconditional call once the
    conditional and unconditional predictions agree (Castillo et al. 2023, Sec. 4.1);
    build it with :func:`adaptive_solver`.

    Attributes:
      inner: the solver (DDIM, Euler, DPM-Solver++(kM), UniPC, DEIS, iPNDM: one
        evaluation per step).
      gamma: the cosine similarity threshold (``>= 1``: never; plain CFG bit for bit).
      on: the predictions compared, ``"eps"`` or ``"x0"``.
    """

    inner: Solver
    gamma: float
    on: str = "eps"

    @property
    def name(self) -> str:
        on = "" if self.on == "eps" else f", on={self.on}"
        return f"adaptive_cfg({self.inner.name}, gamma={self.gamma}{on})"

    @property
    def order(self):
        return self.inner.order

    @property
    def min_steps(self):
        return self.inner.min_steps

    def nfe(self, num_steps, to_data=False, from_noise=False) -> int:
        return self.inner.nfe(num_steps, to_data, from_noise)

    def num_steps(self, nfe, to_data=False, from_noise=False) -> int:
        return self.inner.num_steps(nfe, to_data, from_noise)

    def check_inputs(self, process, grid, x_T) -> None:
        self.inner.check_inputs(process, grid, x_T)

    def finish(self, state, dtype):
        return self.inner.finish(state._replace(aux=state.aux[0]), dtype)

    def init(self, x_T, grid, process, *, key=None, nfe=None):
        state = self.inner.init(x_T, grid, process, key=key, nfe=nfe)
        return state._replace(aux=(state.aux, jnp.zeros((), bool)))

    def step(self, denoiser, state, cond=None):
        if isinstance(denoiser, _CastInput):
            raise TypeError("adaptive_solver samples in float32 or wider: pass x_T as float32")
        _check_cfg(denoiser)
        if denoiser.interval is not None or denoiser.apg is not None:
            raise ValueError("adaptive_solver needs plain classifier-free guidance (no interval=, no apg=)")
        aux, dropped = state.aux
        inner_state = state._replace(aux=aux)
        x, t = state.x, state.grid[state.i]

        def guided():
            w = _scale_at(denoiser.scale, denoiser.scale_fn, t, x)
            pc, pu = denoiser._pair(x, t, cond)
            g, _ = denoiser._combine(x, t, pc, pu, w.astype(pc.x0.dtype), None)
            agree = jnp.all(_agreement(pc, pu, self.on) >= self.gamma)
            return Prediction(g.x0.astype(x.dtype), g.eps.astype(x.dtype)), agree

        def conditional():
            p = denoiser.inner(x, t, cond)
            return Prediction(p.x0.astype(x.dtype), p.eps.astype(x.dtype)), jnp.ones((), bool)

        single = network_calls(denoiser.inner, t)
        if self.gamma >= 1.0:  # never drops: the guided step alone, no lax.cond traced
            pred, _ = guided()
            new = self.inner.step(_Given(pred, 2 * single, denoiser.process), inner_state, cond)
            return new._replace(aux=(new.aux, dropped))
        pred, agree = jax.lax.cond(dropped, conditional, guided)
        calls = jnp.where(dropped, single, 2 * single).astype(jnp.int32)
        new = self.inner.step(_Given(pred, calls, denoiser.process), inner_state, cond)
        return new._replace(aux=(new.aux, dropped | agree))


def adaptive_solver(solver: Solver, gamma: float, *, on: str = "eps") -> AdaptiveGuidanceSolver:
    """Adaptive guidance decided while sampling (Castillo et al. 2023, Sec. 4.1): sample
    with ``jdiff.sample(adaptive_solver(solver, gamma), guidance(den, w, null), ...)``.

    At each step the solver makes the guided pair of calls and measures the cosine
    similarity of eps_c and eps_u per sample (Eq. 6); once the smallest over the batch is
    at least ``gamma``, every later step makes the conditional call alone (one network
    call instead of two; the decision is carried in the solver state, so it holds for the
    rest of the trajectory, and :attr:`jdiff.SampleInfo.nfe` counts the calls taken).
    The decision is per batch: under ``vmap`` over samples, per sample (the ``lax.cond``
    then becomes a select that runs both branches, though the count says what the method
    needs).

    Args:
      solver: a deterministic solver with one network evaluation per step (DDIM, Euler,
        DPM-Solver++(kM), UniPC, DEIS, iPNDM); its ``step`` is given the adaptive step's
        prediction.
      gamma: the threshold; ``>= 1`` never drops (the plain CFG sampler, bit for bit).
      on: the predictions compared: ``"eps"`` (the paper's) or ``"x0"``. With eps the
        first steps out of pure noise agree for any class (both are ~``x_t / sigma``),
        so on a model like the digits one the flag goes up at step 0 and guidance is
        lost; compare x0 there, or use the calibrated :func:`adaptive_guidance`, whose
        switch needs the similarity to stay above ``gamma`` to the end.

    Returns:
      An :class:`AdaptiveGuidanceSolver`. Its denoiser must be a classifier-free guidance
      wrapper (:func:`jdiff.wrappers.guidance`) without interval or APG.

    Raises:
      ValueError: a stochastic solver, one with several evaluations per step or
        guidance options (CFG++, guidance memory), or a NaN ``gamma``.
      TypeError: ``solver`` not a solver, ``gamma`` not a number.
    """
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jdiff Solver, got {type(solver).__name__}")
    gamma = _check_gamma(gamma)
    if solver.stochastic or solver.direction != "to_data":
        raise ValueError(f"adaptive_solver wraps a deterministic solver toward the data, got {solver.name}")
    if solver.init_uses_nfe or any(solver.nfe(n, d) != n for n in (4, 9) for d in (False, True)):
        raise ValueError(f"adaptive_solver needs one network evaluation per step; {solver.name} makes more")
    if getattr(solver, "cfgpp", False) or getattr(solver, "guidance_memory", False):
        raise ValueError(f"adaptive_solver does not combine with CFG++ or guidance memory ({solver.name})")
    return AdaptiveGuidanceSolver(solver, gamma, _check_on(on))
