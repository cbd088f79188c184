"""Score distillation into a one-step generator: variational score distillation with an
auxiliary score network trained alongside (SwiftBrush).

The generator ``G`` is the teacher's architecture, initialized from the teacher and used
as a one-step model: ``G(z) = x0`` predicted at ``(z, t_max)``. Its samples are noised,
``x_t = alpha_t G(z) + sigma_t eps``, and the generator follows the variational score
distillation gradient (Wang et al. 2023, Eq. 9)

    grad_x0 = w(t) (eps_teacher(x_t, t) - eps_aux(x_t, t)),

the difference between the teacher's score and the score of the generator's own
distribution, which an auxiliary network (also initialized from the teacher) learns by
denoising the generator's samples. SwiftBrush (Nguyen & Tran 2024) trains a one-step
text-to-image student this way with no training images; here the student needs only the
labels of the batch (the data itself is not read).

**Two networks, one optimizer.** The trainable parameters are ``{"generator": ...,
"aux": ...}`` and the loss is the sum of two objectives with stop-gradients arranged so
that each part receives only its own gradient: the generator's surrogate sees the aux
network's parameters and the noised sample's targets as constants; the aux network's
denoising loss sees the generator's samples as constants. ``jax.grad`` of the sum is
therefore exactly (VSD gradient for the generator, denoising gradient for the aux
network), and one :func:`jdiff.train.make_optimizer` updates both (Adam normalizes each
parameter on its own, so the two losses' scales do not interfere).

References:
  Wang, Lu, Wang, Bao, Li, Su & Zhu, "ProlificDreamer: High-Fidelity and Diverse
    Text-to-3D Generation with Variational Score Distillation", NeurIPS 2023 (Eq. 9: the
    VSD gradient; the auxiliary network trained by denoising on the generator's samples).
  Nguyen & Tran, "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational
    Score Distillation", CVPR 2024 (the one-step student initialized from the teacher,
    ``x0`` predicted at the last time step, and the aux network trained alongside).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff._param import broadcast_to_x, from_x0_eps, model_time
from jdiff.distill._reflow import check_steps
from jdiff.distill._teacher import DistillError, Recipe, Setup, Teacher

__all__ = ["WEIGHTINGS", "vsd_weight", "vsd_gradient", "vsd_surrogate", "generator_sample", "ScoreDistillation"]

WEIGHTINGS = ("x0", "uniform")
_K_Z, _K_T, _K_EPS, _K_T2, _K_EPS2 = 0x80, 0x81, 0x82, 0x83, 0x84


def vsd_weight(process, t, kind: str = "x0"):
    """``w(t)`` of the VSD gradient: ``"x0"`` is ``sigma_t / alpha_t``, which makes
    ``w (eps_teacher - eps_aux) = x0_aux - x0_teacher`` (the gradient in data units);
    ``"uniform"`` is 1."""
    if kind not in WEIGHTINGS:
        raise DistillError(f"unknown weighting {kind!r}; expected one of {WEIGHTINGS}")
    t = jnp.asarray(t)
    if kind == "uniform":
        return jnp.ones(t.shape, jnp.result_type(t.dtype, jnp.float32))
    return process.sigma(t) / process.alpha(t)


def vsd_gradient(eps_teacher, eps_aux, w):
    """The VSD gradient with respect to the generated sample (Wang et al. 2023, Eq. 9):
    ``w(t) (eps_teacher - eps_aux)``, ``w`` per sample ``(B,)``."""
    return broadcast_to_x(w, eps_teacher) * (eps_teacher - eps_aux)


def vsd_surrogate(x0, grad):
    """A per-sample loss whose gradient with respect to ``x0`` is ``grad``:
    ``0.5 * sum_features (x0 - sg[x0 - grad])^2`` (its value is ``0.5 ||grad||^2``).

    Returns:
      ``(B,)`` values; ``d/dx0_i`` of value ``i`` is ``grad_i`` exactly.
    """
    target = jax.lax.stop_gradient(x0 - grad)
    d = x0 - target
    return 0.5 * jnp.sum((d * d).reshape(d.shape[0], -1), axis=1)


def generator_sample(teacher: Teacher, params, noise, cond=None):
    """The one-step generator ``G(z)``: the network with ``params`` (the teacher's
    architecture) predicting ``x0`` at ``(z * prior_std, t_max)``."""
    proc = teacher.process
    x_T = noise * proc.prior_std().astype(noise.dtype)
    t = jnp.full((noise.shape[0],), proc.t_max, jnp.result_type(noise.dtype, jnp.float32))
    return _x0_at(teacher.denoiser(params), x_T, t, cond)


@jax.jit
def _x0_at(den, x, t, cond):
    return den(x, t, cond).x0


def _normal(keys, c, shape):
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, c), shape, _float()))(keys)


def _float():
    """float64 under ``jax.enable_x64``, else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _uniform(keys, c, lo, hi):
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, c), (), _float(), lo, hi))(keys)


def vsd_loss_fn(teacher: Teacher, *, guidance: float = 1.0, weighting: str = "x0", t_range=(0.02, 0.98)):
    """``loss_fn(params, batch, keys, *, frozen)`` of score distillation, on
    ``params = {"generator": ..., "aux": ...}`` with the teacher's parameters frozen.

    For each sample (its own ``z``, ``t``, ``eps`` from its key; the label
    ``batch["label"]`` for a class-conditional teacher): ``x0 = G(z)``, ``x_t = alpha_t
    x0 + sigma_t eps`` with ``t`` uniform in the fraction ``t_range`` of ``[t_min,
    t_max]``; the generator's term is :func:`vsd_surrogate` of :func:`vsd_gradient`
    (teacher with classifier-free ``guidance``, aux with stopped parameters); the aux
    network's term is the teacher's own regression (its ``prediction`` target, mean
    squared error) at an independent ``(t', eps')`` on ``sg[x0]``. Metrics: ``loss``
    (their sum), ``generator`` and ``aux``.
    """
    proc = teacher.process
    lo = proc.t_min + (proc.t_max - proc.t_min) * float(t_range[0])
    hi = proc.t_min + (proc.t_max - proc.t_min) * float(t_range[1])

    def loss_fn(params, batch, keys, *, frozen=None):
        gen, aux = params["generator"], params["aux"]
        cond = batch.get("label") if teacher.num_classes else None
        n = keys.shape[0]
        z = _normal(keys, _K_Z, tuple(teacher.shape))
        x0 = generator_sample(teacher, gen, z, cond)
        # the generator's term: VSD gradient through the surrogate
        t = _uniform(keys, _K_T, lo, hi)
        eps = _normal(keys, _K_EPS, x0.shape[1:])
        xt = jax.lax.stop_gradient(broadcast_to_x(proc.alpha(t), x0) * x0 + broadcast_to_x(proc.sigma(t), x0) * eps)
        eps_teacher = teacher.denoiser(frozen, guidance)(xt, t, cond).eps
        eps_aux = teacher.denoiser(jax.lax.stop_gradient(aux))(xt, t, cond).eps
        grad = jax.lax.stop_gradient(vsd_gradient(eps_teacher, eps_aux, vsd_weight(proc, t, weighting)))
        l_gen = jnp.mean(vsd_surrogate(x0, grad))
        # the aux network's term: denoising the generator's samples (constants here)
        x0s = jax.lax.stop_gradient(x0)
        t2 = _uniform(keys, _K_T2, proc.t_min, proc.t_max)
        eps2 = _normal(keys, _K_EPS2, x0.shape[1:])
        xt2 = broadcast_to_x(proc.alpha(t2), x0s) * x0s + broadcast_to_x(proc.sigma(t2), x0s) * eps2
        target = from_x0_eps(teacher.prediction, x0s, eps2, t2, proc)
        out = teacher.apply(aux, xt2, model_time(proc, teacher.time_input, t2), cond, None)
        l_aux = jnp.mean(((out - target) ** 2).reshape(n, -1))
        loss = l_gen + l_aux
        return loss, {"loss": loss, "generator": l_gen, "aux": l_aux}

    return loss_fn


class ScoreDistillation(Recipe):
    """Variational score distillation into a one-step generator with an auxiliary score
    network trained alongside (SwiftBrush; Wang et al. 2023).

    ``build(teacher)`` gives ``params = {"generator": teacher copy, "aux": teacher
    copy}``, the teacher's parameters frozen, and :func:`vsd_loss_fn`; ``sample`` draws
    ``G(z)`` (one network call; more steps are refused).

    Options: ``guidance`` (the teacher's classifier-free guidance scale, 1.0),
    ``weighting`` ("x0": ``w = sigma/alpha``, or "uniform"), ``t_range`` (the fraction of
    the time range the VSD times are drawn from, (0.02, 0.98)).
    """

    defaults = {"guidance": 1.0, "weighting": "x0", "t_range": (0.02, 0.98)}
    name = "score_distillation"
    paper = (
        "Nguyen & Tran, 'SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score Distillation', "
        "CVPR 2024; Wang et al., 'ProlificDreamer', NeurIPS 2023"
    )

    def build(self, teacher: Teacher, **options) -> Setup:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise DistillError(f"{self.name}: unknown option(s) {unknown}; accepted: {sorted(self.defaults)}")
        o = {**self.defaults, **options}
        if o["weighting"] not in WEIGHTINGS:
            raise DistillError(f"{self.name}: unknown weighting {o['weighting']!r}; expected one of {WEIGHTINGS}")
        lo, hi = (float(v) for v in o["t_range"])
        if not 0.0 <= lo < hi <= 1.0:
            raise DistillError(f"{self.name}: t_range must be 0 <= lo < hi <= 1, got {o['t_range']!r}")
        copy = jax.tree.map(jnp.array, teacher.params)
        params = {"generator": copy, "aux": jax.tree.map(jnp.array, teacher.params)}
        loss = vsd_loss_fn(teacher, guidance=float(o["guidance"]), weighting=o["weighting"], t_range=(lo, hi))
        notes = {"guidance": float(o["guidance"]), "weighting": o["weighting"], "t_range": [lo, hi]}
        return Setup(params, teacher.params, loss, steps=1, notes=notes)

    def sample(self, teacher, params, noise, *, steps, trained_steps, cond=None, key=None, **kw):
        check_steps(steps, min(int(trained_steps), 1), self.name)
        gen = params["generator"] if isinstance(params, dict) and "generator" in params else params
        return generator_sample(teacher, gen, jnp.asarray(noise, jnp.float32), cond)
