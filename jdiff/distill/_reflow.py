"""Reflow (rectified flow retrained on its own pairs, then distilled to one step) and
SlimFlow (annealing reflow and flow-guided distillation into a smaller student).

Both read the teacher as a rectified flow (:mod:`jdiff.distill._rectify`): any jdiff
process is rectified flow after ``x_rf = x_t / (alpha_t + sigma_t)``, ``s = sigma_t /
(alpha_t + sigma_t)``, so the digits teacher (VP cosine, v-prediction) needs no
retraining to be a 1-rectified flow. Time runs from data (``s = 0``) to noise (``s =
1``): ``x_s = (1 - s) x + s z``, velocity ``dx/ds = z - x`` on a straight path.

References:
  Liu, Gong & Liu, "Flow Straight and Fast: Learning to Generate and Transfer Data with
    Rectified Flow", ICLR 2023 (Eq. 1: the rectified-flow objective; Algorithm 1: reflow
    on the pairs of the previous flow and distillation of the k-rectified flow into one
    step).
  Zhu, Liu & Liu, "SlimFlow: Training Smaller One-Step Diffusion Models with Rectified
    Flow", ECCV 2024 (annealing reflow: the pair noise moved from random to the teacher's
    noise while training; flow-guided distillation: a one-step loss on pairs plus a
    two-step Euler target of the 2-rectified flow).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff.distill._rectify import generate_pairs, load_pairs, rectified_apply
from jdiff.distill._teacher import DistillError, Recipe, Setup, Teacher
from jdiff.models import functional
from jdiff.runs._build import build_model
from jdiff.runs._config import config_from_dict, config_to_dict, set_value

__all__ = [
    "interpolate",
    "reflow_loss",
    "distill_loss",
    "two_step_target",
    "flow_guided_loss",
    "anneal_beta",
    "anneal_noise",
    "student_velocity",
    "check_steps",
    "Reflow",
    "SlimFlow",
]

ANNEALS = ("linear", "cosine", "exp")
# per-sample fold_in constants of the pair-based losses (one stream each)
_K_PAIR, _K_TIME, _K_NOISE, _K_MID = 0x70, 0x71, 0x72, 0x73


def _bx(c, x):
    c = jnp.asarray(c, x.dtype)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def _mse(d):
    """Per-sample mean of squares over the features."""
    return jnp.mean((d * d).reshape(d.shape[0], -1), axis=1)


# ------------------------------------------------------------------------ the losses


def interpolate(z, x, s):
    """The straight path ``x_s = (1 - s) x + s z`` between data ``x`` (``s = 0``) and
    noise ``z`` (``s = 1``); ``s`` of shape ``(B,)``."""
    s = _bx(s, x)
    return (1.0 - s) * x + s * z


def reflow_loss(velocity: Callable, params, z, x, s, cond=None):
    """The rectified-flow objective on a coupling (Liu et al. 2023, Eq. 1), per sample:
    ``mean_features (v(x_s, s) - (z - x))^2`` with ``x_s = (1 - s) x + s z``.

    Trained on independent ``(z, x)`` it is flow matching (the 1-rectified flow); on the
    pairs ``(z, ODE_k(z))`` of a k-rectified flow it is the (k+1)-rectified flow.

    Args:
      velocity: ``velocity(params, x, s, cond) -> dx/ds``.
      z, x: ``(B, ...)`` noise and data of each pair; s: ``(B,)`` times in ``[0, 1]``.

    Returns:
      ``(B,)`` losses.
    """
    v = velocity(params, interpolate(z, x, s), s, cond)
    return _mse(v - (z - x))


def distill_loss(velocity: Callable, params, z, x, cond=None):
    """One-step distillation of a coupling (Liu et al. 2023, Algorithm 1's distillation:
    the rectified-flow loss with the time fixed at the noise end): the one Euler step
    ``x_hat = z - v(z, 1)`` regressed on ``x`` with the L2 distance, ``mean_features
    (x_hat - x)^2`` per sample."""
    s1 = jnp.ones((z.shape[0],), z.dtype)
    return _mse(z - velocity(params, z, s1, cond) - x)


def two_step_target(velocity: Callable, params, z, s_mid, cond=None):
    """Two Euler steps of a flow from ``z`` at ``s = 1``: to ``s_mid`` with ``v(z, 1)``,
    then to ``s = 0`` with the velocity there (SlimFlow's flow guidance, Zhu et al. 2024). ``s_mid``: ``(B,)``."""
    s1 = jnp.ones((z.shape[0],), z.dtype)
    m = _bx(s_mid, z)
    x_mid = z - (1.0 - m) * velocity(params, z, s1, cond)
    return x_mid - m * velocity(params, x_mid, s_mid, cond)


def flow_guided_loss(velocity: Callable, params, flow_params, z, x, s_mid, cond=None, weight: float = 1.0):
    """SlimFlow's flow-guided distillation (Zhu et al. 2024), per sample:

        mean (x_hat - x)^2 + weight * mean (x_hat - sg[T(z)])^2,   x_hat = z - v_theta(z, 1),

    where ``(z, x)`` is a pair of the 2-rectified flow and ``T(z)`` its
    :func:`two_step_target` at ``s_mid`` with the frozen ``flow_params`` (random ``s_mid``
    makes a new regression target for every ``z``, with no pair to store).

    Returns:
      ``(B,)`` losses.
    """
    s1 = jnp.ones((z.shape[0],), z.dtype)
    x_hat = z - velocity(params, z, s1, cond)
    target = jax.lax.stop_gradient(two_step_target(velocity, flow_params, z, s_mid, cond))
    return _mse(x_hat - x) + weight * _mse(x_hat - target)


def anneal_beta(step, anneal_steps: int, kind: str = "linear"):
    """SlimFlow's annealing weight ``beta(k)`` (Zhu et al. 2024, annealing reflow), from 1 at step
    0 to 0: ``1 - k/K`` (linear), ``(1 + cos(pi min(k/K, 1))) / 2`` (cosine) or
    ``exp(-k/K)`` (exp); ``anneal_steps = 0`` gives 0 (plain reflow)."""
    if kind not in ANNEALS:
        raise DistillError(f"unknown anneal {kind!r}; expected one of {ANNEALS}")
    if anneal_steps <= 0:
        return jnp.zeros_like(jnp.asarray(step, jnp.float32))
    u = jnp.asarray(step, jnp.float32) / anneal_steps
    if kind == "linear":
        return jnp.clip(1.0 - u, 0.0, 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(u, 1.0)))
    return jnp.exp(-u)


def anneal_noise(z, xi, beta):
    """The annealed pair noise ``sqrt(1 - beta^2) z + beta xi`` (still standard normal
    when ``z`` and ``xi`` are): random pairs at ``beta = 1``, the teacher's pairs at
    ``beta = 0`` (Zhu et al. 2024, annealing reflow)."""
    beta = jnp.asarray(beta, z.dtype)
    return jnp.sqrt(1.0 - beta * beta) * z + beta * xi


def check_steps(steps, trained_steps, what: str) -> int:
    """``steps`` as an int, or :class:`DistillError` if it is not in ``1..trained_steps``."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise DistillError(f"steps must be a positive integer, got {steps!r}")
    if steps > trained_steps:
        raise DistillError(
            f"this {what} student was trained for at most {trained_steps} step(s); asked for {steps} "
            f"(build it with steps={steps} or sample with fewer steps)"
        )
    return int(steps)


# ------------------------------------------------------------------------- students


def student_velocity(apply: Callable, teacher: Teacher) -> Callable:
    """``velocity(params, x, s, cond)``: the network ``apply`` (trained or initialized in
    the teacher's parameterization) as a rectified-flow velocity, see
    :func:`jdiff.distill._rectify.rectified_apply`."""
    rf = rectified_apply(apply, teacher.process, teacher.prediction, teacher.time_input)

    def velocity(params, x, s, cond=None):
        return rf(params, x, s, cond)

    return velocity


def _student_denoiser(apply, teacher: Teacher, params) -> jdiff.Denoiser:
    rf = rectified_apply(apply, teacher.process, teacher.prediction, teacher.time_input)
    return jdiff.Denoiser(apply_fn=rf, params=params, process=jdiff.rectified_flow(), prediction="flow")


def _euler_sample(apply, teacher, params, noise, steps, cond):
    den = _student_denoiser(apply, teacher, params)
    x = jnp.asarray(noise, jnp.float32)
    return jdiff.sample(jdiff.solvers.euler(), den, x, nfe=steps, final="data", cond=cond)


def _take_options(options: dict, defaults: dict, method: str) -> dict:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise DistillError(f"{method}: unknown option(s) {unknown}; accepted: {sorted(defaults)}")
    return {**defaults, **options}


def _teacher_pairs(teacher: Teacher, o: dict, flow_den=None) -> dict:
    """The pairs of the options: given (a dict or an .npz path), or generated from the
    teacher (``flow_den``: from that rectified-flow student instead)."""
    p = o["pairs"]
    if p is not None:
        try:
            pairs = load_pairs(p) if isinstance(p, str) else {k: np.asarray(p[k]) for k in ("z", "x", "label")}
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise DistillError(f"pairs: {e}") from e
        if pairs["z"].shape[1:] != tuple(teacher.shape) or pairs["x"].shape != pairs["z"].shape:
            raise DistillError(f"pairs of shape {pairs['z'].shape[1:]} for a teacher of data shape {teacher.shape}")
        return pairs
    den = teacher.denoiser(guidance=float(o["guidance"])) if flow_den is None else flow_den
    solver = jdiff.solvers.get(o["pair_solver"])
    made_by = "teacher " + teacher.source if flow_den is None else "flow " + _digest(flow_den.params)
    tag = f"{made_by}; {o['pair_solver']} nfe {o['pair_nfe']}; guidance {o['guidance']}; seed {o['seed']}"
    return generate_pairs(
        den,
        int(o["num_pairs"]),
        teacher.shape,
        key=jax.random.key(int(o["seed"])),
        solver=solver,
        nfe=int(o["pair_nfe"]),
        num_classes=teacher.num_classes,
        batch=int(o["pair_batch"]),
        path=o["pairs_path"],
        tag=tag,
    )


def _digest(params) -> str:
    h = hashlib.sha1()
    for leaf in jax.tree.leaves(params):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()[:16]


def _frozen_pairs(pairs: dict, num_classes: int) -> dict:
    return {
        "z": jnp.asarray(pairs["z"], jnp.float32),
        "x": jnp.asarray(pairs["x"], jnp.float32),
        "label": jnp.asarray(pairs["label"], jnp.int32) if num_classes else None,
    }


def _draw(pairs: dict, keys):
    """Each sample's pair (``fold_in(key_i, _K_PAIR)``: uniform over the stored pairs)."""
    n = pairs["z"].shape[0]
    idx = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, _K_PAIR), (), 0, n))(keys)
    cond = None if pairs["label"] is None else pairs["label"][idx]
    return pairs["z"][idx], pairs["x"][idx], cond


def _float():
    """float64 under ``jax.enable_x64``, else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _uniform(keys, c, lo, hi):
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, c), (), _float(), lo, hi))(keys)


def _flow_loss(velocity, *, t_min=1e-3, anneal_steps=0, anneal="linear"):
    """The reflow stage's ``loss_fn``: pairs from ``frozen["pairs"]``, uniform ``s``,
    annealed noise when ``anneal_steps > 0``. The annealing clock is the train state's
    step (the loss declares ``reads_step``, so :func:`jdiff.train.train_step` passes it and
    a resumed run continues the schedule where it stopped)."""

    def loss_fn(params, batch, keys, *, frozen=None, step=0):
        z, x, cond = _draw(frozen["pairs"], keys)
        s = _uniform(keys, _K_TIME, t_min, 1.0)
        metrics = {}
        if anneal_steps > 0:
            beta = anneal_beta(step, anneal_steps, anneal)
            xi = jax.vmap(lambda k, zz: jax.random.normal(jax.random.fold_in(k, _K_NOISE), zz.shape, zz.dtype))(keys, z)
            z = anneal_noise(z, xi, beta)
            metrics["beta"] = beta
        loss = jnp.mean(reflow_loss(velocity, params, z, x, s, cond))
        return loss, {"loss": loss, **metrics}

    loss_fn.reads_step = anneal_steps > 0
    return loss_fn


def _distill_loss_fn(velocity, *, weight=0.0, mid=(0.2, 0.8)):
    def loss_fn(params, batch, keys, *, frozen=None):
        z, x, cond = _draw(frozen["pairs"], keys)
        if weight > 0:
            s_mid = _uniform(keys, _K_MID, mid[0], mid[1])
            per = flow_guided_loss(velocity, params, frozen["flow"], z, x, s_mid, cond, weight)
        else:
            per = distill_loss(velocity, params, z, x, cond)
        loss = jnp.mean(per)
        return loss, {"loss": loss}

    return loss_fn


_PAIR_DEFAULTS = dict(
    pairs=None,
    pairs_path=None,
    num_pairs=2048,
    pair_nfe=10,
    pair_solver="dpm++2m",
    pair_batch=256,
    guidance=1.0,
    seed=0,
)


# --------------------------------------------------------------------------- recipes


class Reflow(Recipe):
    """Reflow and one-step distillation of a rectified flow (Liu et al. 2023).

    ``build(teacher, stage="reflow")`` trains the (k+1)-rectified flow on pairs ``(z,
    ODE_k(z))`` of the teacher (``k = 1``: the teacher read as a rectified flow) or of a
    previous reflow student (``flow=params``), initialized from that flow; it is sampled
    with Euler at any step count up to ``steps``. ``stage="distill"`` distills the flow
    (``flow=params``, else the teacher) into one Euler step on its own pairs.

    Options: ``stage`` ("reflow" | "distill"); ``flow`` (parameters of a reflow student:
    the flow whose pairs are used and the initialization); ``steps`` (the largest Euler
    step count recorded for a reflow student, default 4; 1 for distill); ``pairs`` (a
    dict ``z``/``x``/``label`` or an ``.npz`` path); ``pairs_path`` (cache file for
    generated pairs); ``num_pairs`` (2048), ``pair_nfe`` (10), ``pair_solver``
    ("dpm++2m"), ``pair_batch``, ``guidance`` (the teacher's CFG scale for its pairs),
    ``seed``; ``t_min`` (smallest training time, 1e-3).
    """

    defaults = {**_PAIR_DEFAULTS, "stage": "reflow", "flow": None, "steps": 4, "t_min": 1e-3}
    name = "reflow"
    paper = (
        "Liu, Gong & Liu, 'Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow', "
        "ICLR 2023"
    )

    def build(self, teacher: Teacher, **options) -> Setup:
        o = _take_options(options, self.defaults, self.name)
        if o["stage"] not in ("reflow", "distill"):
            raise DistillError(f"reflow: stage must be 'reflow' or 'distill', got {o['stage']!r}")
        apply = teacher.apply
        velocity = student_velocity(apply, teacher)
        flow = o["flow"]
        flow_den = None if flow is None else _student_denoiser(apply, teacher, flow)
        pairs = _teacher_pairs(teacher, o, flow_den)
        init = teacher.params if flow is None else flow
        notes = {
            "stage": o["stage"],
            "num_pairs": int(pairs["z"].shape[0]),
            "pair_nfe": int(o["pair_nfe"]),
            "pair_solver": o["pair_solver"],
            "pairs_from": "teacher" if flow is None else "flow",
        }
        frozen = {"pairs": _frozen_pairs(pairs, teacher.num_classes)}
        if o["stage"] == "reflow":
            steps = check_steps(o["steps"], 10**9, self.name)
            loss = _flow_loss(velocity, t_min=float(o["t_min"]))
            return Setup(init, frozen, loss, steps=steps, notes=notes)
        return Setup(init, frozen, _distill_loss_fn(velocity), steps=1, notes=notes)

    def sample(self, teacher, params, noise, *, steps, trained_steps, cond=None, key=None, **kw):
        steps = check_steps(steps, trained_steps, self.name)
        return _euler_sample(teacher.apply, teacher, params, noise, steps, cond)


# ------------------------------------------------------------------------ SlimFlow


@functools.lru_cache(maxsize=8)
def _small_model(cfg_json: str, width: int):
    cfg = config_from_dict(json.loads(cfg_json))
    kind = cfg.model.kind
    if kind == "unet":
        groups = math.gcd(int(cfg.model.unet.num_groups), width)
        cfg = set_value(cfg, "model.unet.base_channels", str(width))
        cfg = set_value(cfg, "model.unet.num_groups", str(groups))
    else:
        cfg = set_value(cfg, "model.mlp.width", str(width))
    # initialized in one compiled program (an eager NNX build runs every initializer alone)
    apply, _ = functional(build_model(cfg, abstract=True))
    params = jax.jit(lambda: functional(build_model(cfg))[1])()
    return apply, params


def _teacher_width(teacher: Teacher) -> int:
    m = teacher.run.cfg.model
    return int(m.unet.base_channels if m.kind == "unet" else m.mlp.width)


def _params_width(params, kind: str) -> int:
    leaf = params["conv_in"]["kernel"] if kind == "unet" else params["proj_in"]["kernel"]
    return int(jnp.shape(jax.tree.leaves(leaf)[0])[-1])


def small_student(teacher: Teacher, width: int):
    """``(apply, params)`` of SlimFlow's student: the teacher's architecture
    (``teacher.run.cfg`` through :func:`jdiff.runs.build_model`) with ``width`` base
    channels (U-Net ``model.unet.base_channels``; MLP ``model.mlp.width``), randomly
    initialized with the configuration's ``init_seed``."""
    if teacher.run is None or teacher.run.cfg.model.kind not in ("unet", "mlp"):
        raise DistillError("slimflow needs a teacher read from a run or a shipped model with a U-Net or MLP")
    if isinstance(width, bool) or int(width) != width or width < 1:
        raise DistillError(f"slimflow: width must be a positive integer, got {width!r}")
    return _small_model(json.dumps(config_to_dict(teacher.run.cfg), sort_keys=True), int(width))


class SlimFlow(Recipe):
    """SlimFlow (Zhu et al. 2024): a smaller one-step rectified flow.

    ``build(teacher, stage="reflow")``: annealing reflow of a student with ``width`` base
    channels (default half the teacher's) from random initialization, on the teacher's
    pairs whose noise is annealed from random (``beta = 1``) to the teacher's (``beta =
    0``) over ``anneal_steps``; the result is a small 2-rectified flow (Euler, up to
    ``steps`` steps). ``build(teacher, stage="distill", flow=params)``: flow-guided
    distillation of that small flow into one step (its own pairs, ``pair_nfe`` steps of
    ``pair_solver``, plus ``guidance_weight`` times the two-step Euler target).

    Options: those of :class:`Reflow` and ``width``, ``anneal_steps`` (1000), ``anneal``
    ("linear" | "cosine" | "exp"), ``guidance_weight`` (1.0); ``flow`` is required for
    ``stage="distill"``.
    """

    defaults = {
        **Reflow.defaults,
        "width": None,
        "anneal_steps": 1000,
        "anneal": "linear",
        "guidance_weight": 1.0,
    }
    name = "slimflow"
    paper = "Zhu, Liu & Liu, 'SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow', ECCV 2024"

    def build(self, teacher: Teacher, **options) -> Setup:
        o = _take_options(options, self.defaults, self.name)
        if o["stage"] not in ("reflow", "distill"):
            raise DistillError(f"slimflow: stage must be 'reflow' or 'distill', got {o['stage']!r}")
        if o["anneal"] not in ANNEALS:
            raise DistillError(f"slimflow: unknown anneal {o['anneal']!r}; expected one of {ANNEALS}")
        if teacher.run is None:
            raise DistillError("slimflow needs a teacher read from a run or a shipped model (its configuration)")
        width = _teacher_width(teacher) // 2 if o["width"] is None else o["width"]
        apply, init = small_student(teacher, width)
        velocity = student_velocity(apply, teacher)
        notes = {"stage": o["stage"], "width": int(width), "teacher_width": _teacher_width(teacher)}
        if o["stage"] == "reflow":
            pairs = _teacher_pairs(teacher, o)
            steps = check_steps(o["steps"], 10**9, self.name)
            anneal_steps = int(o["anneal_steps"])
            loss = _flow_loss(velocity, t_min=float(o["t_min"]), anneal_steps=anneal_steps, anneal=o["anneal"])
            notes.update(num_pairs=int(pairs["z"].shape[0]), anneal_steps=int(o["anneal_steps"]), anneal=o["anneal"])
            return Setup(
                init,
                {"pairs": _frozen_pairs(pairs, teacher.num_classes)},
                loss,
                steps=steps,
                notes=notes,
            )
        flow = o["flow"]
        if flow is None:
            raise DistillError("slimflow stage 'distill' needs flow=PARAMS, the student of stage 'reflow'")
        if jax.tree.structure(flow) != jax.tree.structure(init) or any(
            jnp.shape(a) != jnp.shape(b) for a, b in zip(jax.tree.leaves(flow), jax.tree.leaves(init))
        ):
            raise DistillError(f"slimflow: flow parameters do not fit a student of width {width}")
        pairs = _teacher_pairs(teacher, o, _student_denoiser(apply, teacher, flow))
        frozen = {"pairs": _frozen_pairs(pairs, teacher.num_classes), "flow": flow}
        notes.update(num_pairs=int(pairs["z"].shape[0]), guidance_weight=float(o["guidance_weight"]))
        loss = _distill_loss_fn(velocity, weight=float(o["guidance_weight"]))
        init = jax.tree.map(jnp.array, flow)  # a copy: the trained arrays are not the frozen ones
        return Setup(init, frozen, loss, steps=1, notes=notes)

    def sample(self, teacher, params, noise, *, steps, trained_steps, cond=None, key=None, width=None, **kw):
        steps = check_steps(steps, trained_steps, self.name)
        if teacher.run is None:
            raise DistillError("slimflow needs a teacher read from a run or a shipped model (its configuration)")
        width = _params_width(params, teacher.run.cfg.model.kind) if width is None else width
        apply, _ = small_student(teacher, width)
        return _euler_sample(apply, teacher, params, noise, steps, cond)
