"""Progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of
Diffusion Models", ICLR 2022, Algorithm 2).

A student initialized from the teacher learns to do in one deterministic DDIM step what
the teacher does in two. On the teacher's grid of ``2N`` steps, with the student's time
``t = t_i`` and the teacher's two steps ``t -> t' -> t''`` (``t' = t_{i+1/2}``, ``t'' =
t_{i+1}`` of the student's grid of ``N`` steps):

    z_t' = DDIM_teacher(z_t; t -> t'),   z_t'' = DDIM_teacher(z_t'; t' -> t''),

and the target ``x~`` is the x0 the student's own single DDIM step ``t -> t''`` must
predict to land on ``z_t''``: with ``z_t'' = alpha_t'' x~ + (sigma_t''/sigma_t)(z_t -
alpha_t x~)`` (Algorithm 2),

    x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t).

The loss is ``w(lambda_t) ||x~ - x^_theta(z_t)||^2`` in x space with the paper's
"truncated SNR" weighting ``w = max(SNR_t, 1)`` (``"snr_plus_one"``: ``1 + SNR_t``, the
v-prediction MSE). Every DDIM coefficient comes from :func:`jdiff.solvers.ddim.ddim_table`
(the teacher's steps and the student's step that ``x~`` inverts), so the student is
trained for exactly the sampler it is run with. A round halves the steps; the student of
round ``k`` is the teacher of round ``k + 1`` (:func:`progressive_rounds`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._grid import time_grid
from jdiff._param import Denoiser, broadcast_to_x
from jdiff._sample import sample
from jdiff.distill._teacher import DistillError, Recipe, Setup, Teacher
from jdiff.solvers.ddim import ddim, ddim_table
from jdiff.train._loop import train

__all__ = [
    "WEIGHTINGS",
    "ProgressiveRecipe",
    "RoundResult",
    "x0_weight",
    "student_grid",
    "check_nested",
    "draw_steps",
    "two_step_target",
    "make_progressive_loss",
    "progressive_rounds",
    "check_options",
    "round_steps",
    "round_setup",
    "ddim_student_sample",
]

WEIGHTINGS = ("truncated_snr", "snr_plus_one")

# fold_in constants of the per-sample draws (each sample's randomness comes from its own key)
_C_STEP, _C_NOISE = 0x5052, 0x4E4F


def check_options(method: str, options: dict, defaults: dict) -> dict:
    """``defaults`` updated with ``options``; :class:`DistillError` naming an unknown one."""
    bad = sorted(set(options) - set(defaults))
    if bad:
        raise DistillError(f"{method}: unknown option(s) {', '.join(bad)}; accepted: {', '.join(sorted(defaults))}")
    return {**defaults, **options}


def x0_weight(process, t, weighting: str = "truncated_snr"):
    """The x-space weight ``w(lambda_t)`` of Salimans & Ho (Sec. 4): ``max(SNR, 1)``
    (``"truncated_snr"``) or ``SNR + 1`` (``"snr_plus_one"``, the same as an unweighted
    loss on ``v``), ``SNR = alpha_t^2 / sigma_t^2``. ``t``: ``(B,)``."""
    if weighting not in WEIGHTINGS:
        raise DistillError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    snr = jnp.exp(process.log_snr(jnp.asarray(t)))
    return jnp.maximum(snr, 1.0) if weighting == "truncated_snr" else snr + 1.0


def student_grid(process, steps: int, *, kind: str = "uniform", final: str = "data"):
    """The grid of a student sampled with ``steps`` DDIM steps: :func:`jdiff.time_grid` of
    ``kind`` and ``final`` (default: uniform in ``t`` down to the data, the paper's ``t_i
    = i / N``)."""
    try:
        return time_grid(process, int(steps), kind=kind, final=final)
    except ValueError as e:
        raise DistillError(f"student grid of {steps} steps: {e}") from e


def check_nested(process, steps: int, *, kind: str = "uniform", final: str = "data") -> None:
    """Raise :class:`DistillError` unless the grid of ``steps`` is every other point of
    the grid of ``2 steps`` (progressive distillation trains the ``steps``-step student on
    the teacher's ``2 steps`` grid, and samples it on its own)."""
    fine = np.asarray(student_grid(process, 2 * steps, kind=kind, final=final), np.float64)
    coarse = np.asarray(student_grid(process, steps, kind=kind, final=final), np.float64)
    if not np.allclose(fine[::2], coarse, rtol=1e-5, atol=1e-6):
        raise DistillError(
            f"grid kind={kind!r} final={final!r} is not nested: the {steps}-step grid is not every other point of "
            f"the {2 * steps}-step grid; use kind='uniform' or final='t_min'"
        )


def draw_steps(keys, num_steps: int, shape):
    """Each sample's student step ``i`` uniform in ``0..num_steps-1`` and its noise
    ``eps ~ N(0, I)`` of one example's ``shape``, both from its own key (``keys``: one
    per sample). Returns ``(i (B,) int32, eps (B, *shape) float32)``."""

    def one(k):
        i = jax.random.randint(jax.random.fold_in(k, _C_STEP), (), 0, num_steps)
        e = jax.random.normal(jax.random.fold_in(k, _C_NOISE), shape, jnp.float32)
        return i, e

    return jax.vmap(one)(keys)


def _ddim_rows(process, times):
    """Deterministic DDIM table rows for per-sample grids ``times`` ``(B, K)``."""
    return jax.vmap(lambda g: ddim_table(process, g, 0.0))(times)


def two_step_target(process, teacher: Callable, z, t, t_mid, t_next, cond=None):
    """Salimans & Ho's target ``x~`` (Algorithm 2) and the teacher's two-step result.

    Args:
      process: the process; teacher: ``teacher(x, t, cond) -> Prediction(x0, eps)`` (a
        :class:`jdiff.Denoiser`), ``t`` per sample.
      z: ``(B, ...)`` the noised data at ``t``; t, t_mid, t_next: ``(B,)`` times ``t >
        t_mid > t_next``.

    Returns:
      ``(x_tilde, z_next)``: ``z_next`` the teacher's two deterministic DDIM steps ``t ->
      t_mid -> t_next``, ``x_tilde`` the x0 for which the student's one DDIM step ``t ->
      t_next`` from ``z`` gives ``z_next`` (float32 or wider).
    """
    dt = jnp.result_type(z.dtype, jnp.float32)
    z = z.astype(dt)
    two = _ddim_rows(process, jnp.stack([t, t_mid, t_next], axis=-1))  # rows (B, 2)
    one = _ddim_rows(process, jnp.stack([t, t_next], axis=-1))  # rows (B, 1)
    b = lambda v: broadcast_to_x(v.astype(dt), z)  # noqa: E731
    p = teacher(z, t, cond)
    z_mid = b(two.a[:, 0]) * p.x0 + b(two.keep[:, 0]) * p.eps
    p = teacher(z_mid, t_mid, cond)
    z_next = b(two.a[:, 1]) * p.x0 + b(two.keep[:, 1]) * p.eps
    # the student's step: z_next = a x~ + keep (z - alpha_t x~) / sigma_t
    r = one.keep[:, 0] / process.sigma(t)
    x_tilde = (z_next - b(r) * z) / b(one.a[:, 0] - r * process.alpha(t))
    return x_tilde, z_next


def _label_cond(batch, keys):
    return batch.get("label") if isinstance(batch, dict) else None


def make_progressive_loss(
    apply: Callable,
    process,
    teacher_grid,
    *,
    prediction: str,
    time_input: Any = "t",
    weighting: str = "truncated_snr",
    cond_fn: Callable | None = None,
    data_key: str = "x",
) -> Callable:
    """One round of progressive distillation as ``loss_fn(params, batch, keys, *,
    frozen) -> (loss, metrics)`` for :func:`jdiff.train.train` (``frozen``: the round's
    teacher, the same network ``apply``).

    Args:
      apply: the network ``apply(params, x, t_in, cond, key=None)``, teacher and student.
      process: the process; prediction, time_input: as in :class:`jdiff.Denoiser`.
      teacher_grid: ``(2N + 1,)`` the teacher's grid; the student's is every other point.
      weighting: :func:`x0_weight`'s.
      cond_fn: ``cond_fn(batch, keys) -> cond`` per-sample conditioning (default: the
        batch's ``"label"``, or None).

    Sample ``b`` (its key ``keys[b]``, :func:`draw_steps`) draws the student step ``i``
    and the noise ``eps``; ``z = alpha_t x0 + sigma_t eps`` at ``t = grid[2i]``; the loss
    is the batch mean of ``w(t) mean_features (x~ - x^_student(z, t))^2`` with ``x~`` of
    :func:`two_step_target` on ``grid[2i], grid[2i+1], grid[2i+2]`` (no gradient).
    Metrics: ``loss`` and ``mse`` (unweighted).
    """
    grid = jnp.asarray(teacher_grid)
    if grid.ndim != 1 or grid.shape[0] < 3 or (grid.shape[0] - 1) % 2:
        raise DistillError(f"the teacher grid needs 2N + 1 points (N >= 1), got shape {grid.shape}")
    n_student = (grid.shape[0] - 1) // 2
    cond_fn = cond_fn or _label_cond
    x0_weight(process, grid[:1], weighting)  # checks the name

    def loss_fn(params, batch, keys, *, frozen=None):
        if frozen is None:
            raise DistillError("progressive distillation needs the round's teacher as frozen parameters")
        x0 = jnp.asarray(batch[data_key])
        dt = jnp.result_type(x0.dtype, jnp.float32)
        i, eps = draw_steps(keys, n_student, x0.shape[1:])
        g = grid.astype(dt)
        t, t_mid, t_next = g[2 * i], g[2 * i + 1], g[2 * i + 2]
        x0f = x0.astype(dt)
        z = broadcast_to_x(process.alpha(t), x0f) * x0f + broadcast_to_x(process.sigma(t), x0f) * eps.astype(dt)
        cond = cond_fn(batch, keys)
        teacher = Denoiser(apply, frozen, process, prediction, time_input)
        x_tilde, _ = two_step_target(process, teacher, z, t, t_mid, t_next, cond)
        x_tilde = jax.lax.stop_gradient(x_tilde)
        x_hat = Denoiser(apply, params, process, prediction, time_input)(z, t, cond).x0
        err = jnp.mean(jnp.square(x_hat - x_tilde).reshape(x0.shape[0], -1), axis=1)
        loss = jnp.mean(x0_weight(process, t, weighting).astype(dt) * err)
        return loss, {"loss": loss, "mse": jnp.mean(err)}

    return loss_fn


def ddim_student_sample(
    den, noise, *, steps: int, trained_steps: int, cond=None, kind: str = "uniform", final: str = "data"
):
    """Deterministic DDIM with ``steps`` steps on :func:`student_grid` (a student's own
    sampler). :class:`DistillError` when ``steps`` is not in ``1..trained_steps``."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise DistillError(f"steps must be a positive integer, got {steps!r}")
    if steps > trained_steps:
        raise DistillError(
            f"this student was trained for {trained_steps} step(s); asked for {steps}: "
            f"use steps <= {trained_steps} (or the teacher for more)"
        )
    grid = student_grid(den.process, int(steps), kind=kind, final=final)
    return sample(ddim(), den, noise, grid, cond=cond)


_DEFAULTS = dict(
    start_steps=16,
    rounds=None,
    round=0,
    teacher_params=None,
    grid="uniform",
    final="data",
    weighting="truncated_snr",
)


def _plan(method: str, o: dict) -> tuple[int, int, int]:
    """``(start_steps, rounds, round)`` checked: start_steps a multiple of 2^rounds."""
    start, rounds, k = o["start_steps"], o["rounds"], o["round"]
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 2:
        raise DistillError(f"{method}: start_steps must be an integer >= 2, got {start!r}")
    max_rounds = (start & -start).bit_length() - 1  # halvings that stay integers
    rounds = max_rounds if rounds is None else rounds
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or not 1 <= rounds <= max_rounds:
        raise DistillError(
            f"{method}: rounds must be in 1..{max_rounds} for start_steps={start} (halvings), got {rounds!r}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < rounds:
        raise DistillError(f"{method}: round must be in 0..{rounds - 1}, got {k!r}")
    return int(start), int(rounds), int(k)


def round_steps(start_steps: int, rounds: int) -> list[tuple[int, int]]:
    """``[(teacher_steps, student_steps), ...]`` of the rounds: ``start_steps`` halved
    ``rounds`` times."""
    return [(start_steps >> k, start_steps >> (k + 1)) for k in range(rounds)]


def round_setup(
    method: str,
    apply: Callable,
    process,
    teacher_params,
    teacher_steps: int,
    *,
    prediction: str,
    time_input,
    grid: str,
    final: str,
    weighting: str,
    cond_fn: Callable | None = None,
    notes: dict | None = None,
) -> Setup:
    """The :class:`Setup` of one round: teacher ``teacher_params`` at ``teacher_steps``,
    student initialized from it, ``teacher_steps / 2`` steps."""
    student_steps = teacher_steps // 2
    check_nested(process, student_steps, kind=grid, final=final)
    tgrid = student_grid(process, teacher_steps, kind=grid, final=final)
    loss_fn = make_progressive_loss(
        apply, process, tgrid, prediction=prediction, time_input=time_input, weighting=weighting, cond_fn=cond_fn
    )
    frozen = jax.tree.map(jnp.asarray, teacher_params)
    params = jax.tree.map(jnp.copy, frozen)
    info = dict(
        method=method,
        teacher_steps=teacher_steps,
        student_steps=student_steps,
        grid=grid,
        final=final,
        weighting=weighting,
        network_calls_per_loss=3,
    )
    info.update(notes or {})
    return Setup(params=params, frozen=frozen, loss_fn=loss_fn, steps=student_steps, notes=info)


class ProgressiveRecipe(Recipe):
    """Progressive distillation (``--method progressive``).

    Options of :meth:`build`: ``start_steps`` (16: the teacher's DDIM steps in round
    0), ``rounds`` (halvings planned; default all the way to one step),
    ``round`` (0: which round to build), ``teacher_params`` (the round's teacher: the
    previous round's student; default the teacher's own), ``grid`` / ``final`` (the
    DDIM grid, :func:`student_grid`), ``weighting`` (``"truncated_snr"``).
    """

    name = "progressive"
    defaults = _DEFAULTS  # every option of build, with its default (jdiff distill --set)
    paper = "Salimans & Ho, Progressive Distillation for Fast Sampling of Diffusion Models, ICLR 2022"

    def build(self, teacher: Teacher, **options) -> Setup:
        """The :class:`Setup` of round ``round``: the student (initialized from the
        round's teacher) trained for ``start_steps / 2^(round + 1)`` DDIM steps.

        Raises:
          DistillError: unknown options, ``start_steps`` not divisible by ``2^rounds``,
            ``round`` outside ``0..rounds-1``, a grid that is not nested.
        """
        o = check_options(self.name, options, _DEFAULTS)
        start, rounds, k = _plan(self.name, o)
        params = teacher.params if o["teacher_params"] is None else o["teacher_params"]
        return round_setup(
            self.name,
            teacher.apply,
            teacher.process,
            params,
            start >> k,
            prediction=teacher.prediction,
            time_input=teacher.time_input,
            grid=o["grid"],
            final=o["final"],
            weighting=o["weighting"],
            notes=dict(start_steps=start, rounds=rounds, round=k),
        )

    def sample(
        self,
        teacher: Teacher,
        params,
        noise,
        *,
        steps: int,
        trained_steps: int,
        cond=None,
        key=None,
        grid: str = "uniform",
        final: str = "data",
    ):
        """Deterministic DDIM with ``steps`` (``<= trained_steps``) network calls on the
        student's grid. Raises :class:`DistillError` for more steps than trained."""
        del key
        den = teacher.denoiser(params)
        return ddim_student_sample(
            den, noise, steps=steps, trained_steps=trained_steps, cond=cond, kind=grid, final=final
        )


PROGRESSIVE = ProgressiveRecipe()


@dataclasses.dataclass
class RoundResult:
    """One finished round of :func:`progressive_rounds`: the student's ``steps``, its
    trained ``params`` and the :class:`jdiff.train.TrainResult`."""

    steps: int
    params: Any
    result: Any


def progressive_rounds(
    teacher: Teacher,
    data,
    *,
    steps_per_round: int,
    optimizer,
    recipe: Recipe = PROGRESSIVE,
    start_steps: int = 16,
    rounds: int | None = None,
    teacher_params=None,
    seed: int = 0,
    ema_decay: float | None = None,
    callbacks=(),
    on_round: Callable | None = None,
    **options,
) -> list[RoundResult]:
    """Run the rounds of progressive distillation with :func:`jdiff.train.train`: round
    ``k`` distills ``start_steps / 2^k`` teacher steps into ``start_steps / 2^(k+1)``
    student steps, and its student is the teacher of round ``k + 1``.

    Args:
      teacher: the :class:`Teacher` (its network is every round's network).
      data: a callable ``step -> batch`` (or what :func:`jdiff.train.train` accepts),
        batches ``{"x": (B, ...), "label": (B,)}``.
      steps_per_round: optimizer updates per round; optimizer: an optax transformation
        (fresh state each round).
      recipe: the recipe building each round (``progressive``; the guided recipe with
        ``stage="progressive"`` for Meng et al.'s stage two).
      start_steps, rounds: the plan (see :class:`ProgressiveRecipe`).
      teacher_params: round 0's teacher (default ``teacher.params``).
      seed: round ``k`` trains with seed ``seed + k``.
      ema_decay: the students' EMA (None: the final parameters are the student).
      callbacks: :func:`jdiff.train.train` callbacks for every round.
      on_round: called ``on_round(RoundResult)`` after each round (e.g. to save it).
      **options: further build options of ``recipe`` (grid, final, weighting, ...).

    Returns:
      the list of :class:`RoundResult`, one per round.
    """
    plan = _plan(recipe.name, dict(start_steps=start_steps, rounds=rounds, round=0))
    current = teacher.params if teacher_params is None else teacher_params
    out = []
    for k in range(plan[1]):
        setup = recipe.build(
            teacher, start_steps=start_steps, rounds=plan[1], round=k, teacher_params=current, **options
        )
        res = train(
            setup.loss_fn,
            setup.params,
            data,
            steps_per_round,
            optimizer=optimizer,
            frozen=setup.frozen,
            seed=seed + k,
            ema_decay=ema_decay,
            callbacks=callbacks,
            handle_sigterm=False,
        )
        params = res.state.params if ema_decay is None else res.state.ema_params
        current = jax.tree.map(np.asarray, params)
        r = RoundResult(setup.steps, current, res)
        out.append(r)
        if on_round is not None:
            on_round(r)
    return out
