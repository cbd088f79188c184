"""Guided distillation (Meng, Rombach, Gao, Kingma, Ermon, Ho & Salimans, "On Distillation
of Guided Diffusion Models", CVPR 2023).

Classifier-free guidance costs two network calls per step. Meng et al. distill it in two
stages:

1. one student ``x^_eta(z_t, w)``, conditioned on the guidance scale ``w``, matches the
   guided teacher's prediction at random ``w`` in ``[w_min, w_max]``:
   ``E_{w, t, x} w(lambda_t) ||x^_eta(z_t, w) - x^w_theta(z_t)||^2`` with the guided
   x0 ``x^w_theta = x^_theta(z_t, uncond) + w (x^_theta(z_t, c) - x^_theta(z_t,
   uncond))`` (the paper writes ``(1 + w') x^_c - w' x^``: its ``w'`` is jdiff's
   guidance scale ``w`` minus 1, so ``w = 1`` is the conditional model);
2. progressive distillation (:mod:`jdiff.distill._progressive`) of that student, every
   sample with its own random ``w``, so that the few-step student keeps the knob.

The w-conditioning is added without touching the network's code: :class:`GuidedApply`
wraps a jdiff model (U-Net, MLP, DiT: every one embeds its time with ``time_embed``) and
adds a learned embedding of ``w`` (sinusoidal features of ``w``, a two-layer MLP whose
output layer starts at zero) to the time embedding, as Meng et al. do. At
initialization the student is therefore the teacher, bit for bit, at every ``w``. Its
parameters are ``{"net": <the teacher's structure>, "w": <the embedding MLP>}`` and its
conditioning ``{"label": (B,) int, "w": (B,) float}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdiff._param import Denoiser
from jdiff.distill._progressive import (
    _plan,
    check_options,
    ddim_student_sample,
    progressive_rounds,
    round_setup,
    x0_weight,
)
from jdiff.distill._teacher import DistillError, Recipe, Setup, Teacher
from jdiff.models import Apply, sinusoidal_embedding
from jdiff.train._loop import train
from jdiff.train._objectives import noise_batch
from jdiff.wrappers import guidance as cfg_guidance

__all__ = [
    "GuidedRecipe",
    "GuidedApply",
    "init_w_embedding",
    "w_embedding",
    "guided_target",
    "draw_w",
    "make_guided_loss",
    "guided_distill",
]

W_SCALE = 100.0  # sinusoidal features of 100 w: periods from 2 pi / 100 to ~600 in w
_C_W = 0x5757


def init_w_embedding(key, dim: int, freq_dim: int = 64) -> dict:
    """Parameters of the w embedding: ``fc1`` (Lecun-normal, ``freq_dim -> dim``) and
    ``fc2`` (``dim -> dim``, zeros: the embedding starts at exactly 0)."""
    k1, _ = jax.random.split(key)
    w1 = jax.random.normal(k1, (freq_dim, dim), jnp.float32) / np.sqrt(freq_dim)
    return {
        "fc1": {"kernel": w1, "bias": jnp.zeros((dim,), jnp.float32)},
        "fc2": {"kernel": jnp.zeros((dim, dim), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)},
    }


def w_embedding(params: dict, w):
    """``fc2(SiLU(fc1(sinusoidal(W_SCALE w))))``: ``(B, dim)`` for ``w`` ``(B,)``."""
    freq = params["fc1"]["kernel"].shape[0]
    h = sinusoidal_embedding(jnp.asarray(w, jnp.float32), freq, scale=W_SCALE)
    h = jax.nn.silu(h @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    return h @ params["fc2"]["kernel"] + params["fc2"]["bias"]


class _ShiftedTime:
    """The model's time embedding plus a fixed per-sample vector."""

    def __init__(self, inner, shift):
        self.inner, self.shift = inner, shift

    def __call__(self, t):
        e = self.inner(t)
        return e + self.shift.astype(e.dtype)


@dataclasses.dataclass(frozen=True)
class GuidedApply:
    """A w-conditioned network from a jdiff model's :class:`jdiff.models.Apply`:
    ``apply(params, x, t_in, cond, key=None)`` with ``params = {"net": ..., "w": ...}``
    and ``cond = {"label": labels or None, "w": (B,) scales}``; the embedding of ``w``
    (:func:`w_embedding`) is added to the model's time embedding."""

    base: Apply

    def __call__(self, params, x, t, cond=None, key=None):
        model = nnx.merge(self.base.graphdef, params["net"], copy=True)
        w = jnp.broadcast_to(jnp.asarray(cond["w"], jnp.float32), (x.shape[0],))
        model.time_embed = _ShiftedTime(model.time_embed, w_embedding(params["w"], w))
        return model(x, t, cond.get("label"), rngs=key)


def guided_apply(teacher: Teacher) -> GuidedApply:
    """:class:`GuidedApply` of the teacher's network; :class:`DistillError` if it is
    not a jdiff model with a time embedding."""
    base = teacher.apply
    if not isinstance(base, Apply):
        raise DistillError(
            f"guided distillation adds w to a jdiff model's time embedding; the teacher's network is "
            f"{type(base).__name__}, not a jdiff model (jdiff.models.functional)"
        )
    return GuidedApply(base)


def _embed_dim(teacher: Teacher) -> int:
    model = nnx.merge(teacher.apply.graphdef, teacher.params, copy=True)
    if not hasattr(model, "time_embed"):
        raise DistillError(f"the teacher's network ({type(model).__name__}) has no time_embed to add w to")
    return int(jax.eval_shape(model.time_embed, jax.ShapeDtypeStruct((1,), jnp.float32)).shape[-1])


def draw_w(keys, w_min: float, w_max: float):
    """Each sample's guidance scale, uniform in ``[w_min, w_max]``, from its own key."""
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _C_W), ()))(keys)
    return w_min + (w_max - w_min) * u


def guided_target(teacher: Denoiser, z, t, labels, w, null_class: int):
    """The guided teacher's x0, ``x^(z, null) + w (x^(z, labels) - x^(z, null))`` per
    sample (:func:`jdiff.wrappers.guidance`, one batch of ``2B``)."""
    return cfg_guidance(teacher, w, null_class)(z, t, labels).x0


def make_guided_loss(
    student_apply: Callable,
    teacher_apply: Callable,
    process,
    *,
    prediction: str,
    time_input: Any = "t",
    num_classes: int,
    w_min: float = 1.0,
    w_max: float = 3.0,
    weighting: str = "truncated_snr",
    data_key: str = "x",
    label_key: str = "label",
) -> Callable:
    """Stage one of Meng et al.: ``loss_fn(params, batch, keys, *, frozen)`` with the
    teacher's parameters as ``frozen``.

    Sample ``b`` draws ``(t, eps, z_t)`` with :func:`jdiff.train.noise_batch` (uniform
    ``t``) and ``w`` with :func:`draw_w`; the loss is the batch mean of ``x0_weight(t)
    mean_features (x^_student(z_t, label, w) - guided_target)^2``
    (:func:`jdiff.distill._progressive.x0_weight`). ``student_apply(params, x, t_in,
    {"label", "w"})`` is the w-conditioned network; ``teacher_apply`` the teacher's.
    """
    x0_weight(process, jnp.zeros((1,)), weighting)
    if num_classes < 1:
        raise DistillError("guided distillation needs a class-conditional teacher (classifier-free guidance)")

    def loss_fn(params, batch, keys, *, frozen=None):
        if frozen is None:
            raise DistillError("guided distillation needs the teacher as frozen parameters")
        x0 = jnp.asarray(batch[data_key])
        labels = batch.get(label_key)
        if labels is None:
            labels = jnp.full((x0.shape[0],), num_classes, jnp.int32)
        t, _, z = noise_batch(process, x0, keys)
        w = draw_w(keys, w_min, w_max)
        teacher = Denoiser(teacher_apply, frozen, process, prediction, time_input)
        target = jax.lax.stop_gradient(guided_target(teacher, z, t, labels, w, num_classes))
        student = Denoiser(student_apply, params, process, prediction, time_input)
        x_hat = student(z, t, {"label": labels, "w": w}).x0
        err = jnp.mean(jnp.square(x_hat - target).reshape(x0.shape[0], -1), axis=1)
        loss = jnp.mean(x0_weight(process, t, weighting).astype(err.dtype) * err)
        return loss, {"loss": loss, "mse": jnp.mean(err)}

    return loss_fn


_DEFAULTS = dict(
    stage="match",
    w_min=1.0,
    w_max=3.0,
    start_steps=16,
    rounds=None,
    round=0,
    teacher_params=None,
    grid="uniform",
    final="data",
    weighting="truncated_snr",
    embed_seed=0,
)


class GuidedRecipe(Recipe):
    """Guided distillation (``--method guided``).

    Options of :meth:`build`: ``stage`` (``"match"``: stage one, the w-conditioned
    student matches the guided teacher; ``"progressive"``: one round of stage two),
    ``w_min`` / ``w_max`` (1, 3: the range of jdiff guidance scales trained),
    ``start_steps`` / ``rounds`` / ``round`` / ``grid`` / ``final`` / ``weighting`` (as
    :class:`~jdiff.distill._progressive.ProgressiveRecipe`), ``teacher_params`` (stage
    two: the w-conditioned teacher of the round, required), ``embed_seed``.
    """

    name = "guided"
    defaults = _DEFAULTS  # every option of build, with its default (jdiff distill --set)
    paper = "Meng et al., On Distillation of Guided Diffusion Models, CVPR 2023"

    def build(self, teacher: Teacher, **options) -> Setup:
        """Stage one (``stage="match"``: a student of ``start_steps`` steps) or round
        ``round`` of stage two (``stage="progressive"``).

        Raises:
          DistillError: unknown options, an unconditional teacher or one that is not a
            jdiff model, ``w_min > w_max``, stage two without ``teacher_params``, a
            progressive plan that does not halve (see the progressive recipe).
        """
        o = check_options(self.name, options, _DEFAULTS)
        if not teacher.num_classes:
            raise DistillError("guided distillation needs a class-conditional teacher (classifier-free guidance)")
        w_min, w_max = float(o["w_min"]), float(o["w_max"])
        if not w_min <= w_max:
            raise DistillError(f"guided: w_min ({w_min}) must be <= w_max ({w_max})")
        start, rounds, k = _plan(self.name, o)
        apply = guided_apply(teacher)
        notes = dict(w_min=w_min, w_max=w_max, start_steps=start, rounds=rounds, stage=o["stage"])
        if o["stage"] == "match":
            dim = _embed_dim(teacher)
            params = {
                "net": jax.tree.map(jnp.copy, jax.tree.map(jnp.asarray, teacher.params)),
                "w": init_w_embedding(jax.random.key(int(o["embed_seed"])), dim),
            }
            loss_fn = make_guided_loss(
                apply,
                teacher.apply,
                teacher.process,
                prediction=teacher.prediction,
                time_input=teacher.time_input,
                num_classes=teacher.num_classes,
                w_min=w_min,
                w_max=w_max,
                weighting=o["weighting"],
            )
            notes.update(method=self.name, network_calls_per_loss=3, grid=o["grid"], final=o["final"])
            return Setup(params=params, frozen=teacher.params, loss_fn=loss_fn, steps=start, notes=notes)
        if o["stage"] != "progressive":
            raise DistillError(f"guided: stage must be 'match' or 'progressive', got {o['stage']!r}")
        tp = o["teacher_params"]
        if not (isinstance(tp, dict) and set(tp) == {"net", "w"}):
            raise DistillError(
                "guided stage 'progressive' needs teacher_params: the w-conditioned student of stage 'match' "
                "({'net': ..., 'w': ...})"
            )
        ncls = teacher.num_classes

        def cond_fn(batch, keys):
            labels = batch.get("label")
            if labels is None:
                labels = jnp.full((keys.shape[0],), ncls, jnp.int32)
            return {"label": labels, "w": draw_w(keys, w_min, w_max)}

        notes.update(round=k)
        return round_setup(
            self.name,
            apply,
            teacher.process,
            tp,
            start >> k,
            prediction=teacher.prediction,
            time_input=teacher.time_input,
            grid=o["grid"],
            final=o["final"],
            weighting=o["weighting"],
            cond_fn=cond_fn,
            notes=notes,
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
        guidance: float = 1.0,
        grid: str = "uniform",
        final: str = "data",
    ):
        """Deterministic DDIM with ``steps`` (``<= trained_steps``) calls of the
        w-conditioned student at guidance scale ``guidance`` (a number or ``(n,)``;
        one network call per step). ``cond``: labels (None: the null class)."""
        del key
        n = noise.shape[0]
        labels = jnp.full((n,), teacher.num_classes, jnp.int32) if cond is None else jnp.asarray(cond)
        w = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (n,))
        den = Denoiser(guided_apply(teacher), params, teacher.process, teacher.prediction, teacher.time_input)
        return ddim_student_sample(
            den, noise, steps=steps, trained_steps=trained_steps, cond={"label": labels, "w": w}, kind=grid, final=final
        )


GUIDED = GuidedRecipe()


def guided_distill(
    teacher: Teacher,
    data,
    *,
    match_steps: int,
    steps_per_round: int,
    optimizer,
    start_steps: int = 16,
    rounds: int | None = None,
    seed: int = 0,
    callbacks=(),
    on_round: Callable | None = None,
    on_match: Callable | None = None,
    **options,
):
    """Both stages with :func:`jdiff.train.train`: ``match_steps`` updates of stage one,
    then :func:`~jdiff.distill._progressive.progressive_rounds` of stage two
    (``steps_per_round`` each). ``options``: ``w_min``, ``w_max``, ``grid``, ``final``,
    ``weighting``. ``on_match(stage_one_params)`` is called after stage one and
    ``on_round(RoundResult)`` after every round. Returns ``(stage_one_params,
    [RoundResult, ...])``."""
    setup = GUIDED.build(teacher, stage="match", start_steps=start_steps, rounds=rounds, **options)
    res = train(
        setup.loss_fn,
        setup.params,
        data,
        match_steps,
        optimizer=optimizer,
        frozen=setup.frozen,
        seed=seed,
        ema_decay=None,
        callbacks=callbacks,
        handle_sigterm=False,
    )
    stage_one = jax.tree.map(np.asarray, res.state.params)
    if on_match is not None:
        on_match(stage_one)
    rounds_out = progressive_rounds(
        teacher,
        data,
        steps_per_round=steps_per_round,
        optimizer=optimizer,
        recipe=GUIDED,
        start_steps=start_steps,
        rounds=rounds,
        teacher_params=stage_one,
        seed=seed + 1,
        callbacks=callbacks,
        on_round=on_round,
        stage="progressive",
        **options,
    )
    return stage_one, rounds_out
