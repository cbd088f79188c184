"""MMD fine-tuning of a few-step sampler (Aiello, Valsesia & Magli, "Fast Inference in
Denoising Diffusion Models via MMD Finetuning", 2023: MMD-DDM).

The network is fine-tuned so that the output distribution of a fixed few-step sampler
(deterministic DDIM with ``k`` steps through :func:`jdiff.sample`, differentiated end to
end with a gradient strategy of :mod:`jdiff._gradient`, :class:`jdiff.Remat` by default)
matches the data in a feature space, by the unbiased estimate of the squared maximum
mean discrepancy (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012, Eq. 3):

    MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
              - 2/(mn) sum_{i, j} k(x_i, y_j),

``x`` the features of ``m`` generated samples, ``y`` those of ``n`` data. Kernels: the
cubic polynomial ``k(x, y) = (x.y / d + 1)^3`` of KID (Binkowski et al., "Demystifying
MMD GANs", ICLR 2018) and a Gaussian RBF ``sum_s exp(-|x - y|^2 / (2 s^2))`` over
bandwidths ``s`` (default: the median pairwise distance times 0.5, 1, 2, held constant
for the gradient). Features: the shipped digits classifier's penultimate layer
(:mod:`jdiff.features.digits`, the FD-digits features) or the raw pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._gradient import Backprop, GradientStrategy, Remat
from jdiff._param import Denoiser
from jdiff._sample import sample
from jdiff.distill._progressive import check_options, ddim_student_sample, student_grid
from jdiff.distill._teacher import DistillError, Recipe, Setup, Teacher
from jdiff.features.digits import IMAGE_SHAPE, DigitsClassifier
from jdiff.solvers.ddim import ddim

__all__ = [
    "KERNELS",
    "FEATURES",
    "MMDRecipe",
    "poly_kernel",
    "rbf_kernel",
    "median_bandwidths",
    "mmd2_unbiased",
    "make_kernel",
    "feature_fn",
    "make_mmd_loss",
    "draw_noise",
]

KERNELS = ("poly", "rbf")
FEATURES = ("digits", "pixels")
_C_NOISE = 0x4D4D
_REMAT = Remat()  # the default gradient strategy (an immutable value)


def poly_kernel(x, y, *, degree: int = 3, coef: float = 1.0):
    """``(x.y / d + coef)^degree`` for ``x`` ``(m, d)``, ``y`` ``(n, d)``: ``(m, n)``."""
    return (x @ y.T / x.shape[-1] + coef) ** degree


def _sq_dists(x, y):
    d = jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * x @ y.T
    return jnp.maximum(d, 0.0)


def rbf_kernel(x, y, *, bandwidths):
    """``sum_s exp(-|x - y|^2 / (2 s^2))`` over the bandwidths ``s``: ``(m, n)``."""
    d = _sq_dists(x, y)
    s = jnp.asarray(bandwidths, d.dtype).reshape(-1)
    return jnp.sum(jnp.exp(-d[..., None] / (2.0 * s * s)), axis=-1)


def median_bandwidths(x, y, factors=(0.5, 1.0, 2.0)):
    """The median heuristic: the median distance between the pooled points (off the
    diagonal) times ``factors``, without gradient."""
    z = jax.lax.stop_gradient(jnp.concatenate([x, y]))
    rows, cols = np.triu_indices(z.shape[0], 1)  # each pair once: the same median as all i != j
    med = jnp.sqrt(jnp.maximum(jnp.median(_sq_dists(z, z)[rows, cols]), 1e-12))
    return med * jnp.asarray(factors, med.dtype)


def make_kernel(kind: str = "poly", *, degree: int = 3, coef: float = 1.0, bandwidths=None) -> Callable:
    """``kernel(x, y, pooled) -> (m, n)`` of ``kind`` (``pooled = (x_all, y_all)``, the
    two samples, for the RBF median heuristic when ``bandwidths`` is None)."""
    if kind == "poly":
        return lambda x, y, pooled: poly_kernel(x, y, degree=degree, coef=coef)
    if kind == "rbf":
        if bandwidths is None:
            return lambda x, y, pooled: rbf_kernel(x, y, bandwidths=median_bandwidths(*pooled))
        return lambda x, y, pooled: rbf_kernel(x, y, bandwidths=bandwidths)
    raise DistillError(f"unknown kernel {kind!r}; expected one of {KERNELS}")


def mmd2_unbiased(x, y, kernel: Callable):
    """The unbiased ``MMD^2_u`` (module docstring) of features ``x`` ``(m, d)`` and ``y``
    ``(n, d)``, ``m, n >= 2``, with ``kernel(a, b, (x, y)) -> (len(a), len(b))``."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise DistillError(f"the unbiased MMD needs at least 2 samples on each side, got {m} and {n}")
    kxx, kyy, kxy = kernel(x, x, (x, y)), kernel(y, y, (x, y)), kernel(x, y, (x, y))
    sxx = (jnp.sum(kxx) - jnp.trace(kxx)) / (m * (m - 1))
    syy = (jnp.sum(kyy) - jnp.trace(kyy)) / (n * (n - 1))
    return sxx + syy - 2.0 * jnp.mean(kxy)


def feature_fn(kind: str, shape) -> Callable:
    """``features(images (B, *shape)) -> (B, d)``: ``"digits"`` the FD-digits
    classifier's 64 features of the images clipped to [-1, 1] (8x8x1 only), ``"pixels"``
    the flattened values."""
    if kind == "pixels":
        return lambda x: x.reshape(x.shape[0], -1)
    if kind == "digits":
        if tuple(shape) != IMAGE_SHAPE:
            raise DistillError(
                f"features='digits' reads {IMAGE_SHAPE} digits images; the teacher's data is {tuple(shape)}"
            )
        clf = DigitsClassifier.load()
        return lambda x: clf.apply(jnp.clip(x.astype(jnp.float32), -1.0, 1.0))[0]
    raise DistillError(f"unknown features {kind!r}; expected one of {FEATURES}")


def draw_noise(keys, shape):
    """Each sample's starting noise ``N(0, I)`` of one example's ``shape`` from its own
    key: ``(B, *shape)`` float32."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _C_NOISE), tuple(shape), jnp.float32))(keys)


def make_mmd_loss(
    apply: Callable,
    process,
    grid,
    *,
    prediction: str,
    time_input: Any = "t",
    features: Callable,
    kernel: Callable,
    gradient: GradientStrategy = _REMAT,
    data_key: str = "x",
    label_key: str = "label",
) -> Callable:
    """MMD-DDM's objective as ``loss_fn(params, batch, keys, *, frozen=None)``.

    Sample ``b`` draws its starting noise from its own key; the ``B`` samples of
    deterministic DDIM over ``grid`` (conditioned on the batch's labels, so the
    generated classes are the data's) are compared with the batch's data by
    :func:`mmd2_unbiased` of their ``features``. The gradient goes through the whole
    sampling chain by ``gradient``. Metrics: ``loss`` (= ``mmd2``).
    """
    grid = jnp.asarray(grid)

    def loss_fn(params, batch, keys, *, frozen=None):
        del frozen
        y = jnp.asarray(batch[data_key])
        labels = batch.get(label_key) if label_key else None
        noise = draw_noise(keys, y.shape[1:])
        den = Denoiser(apply, params, process, prediction, time_input)
        x = sample(ddim(), den, noise.astype(y.dtype), grid, cond=labels, gradient=gradient)
        mmd = mmd2_unbiased(features(x), features(y), kernel)
        return mmd, {"loss": mmd, "mmd2": mmd}

    return loss_fn


_GRADIENTS = {"remat": _REMAT, "backprop": Backprop()}
_DEFAULTS = dict(
    steps=4,
    kernel="rbf",
    features="digits",
    degree=3,
    coef=1.0,
    bandwidths=None,
    gradient="remat",
    grid="uniform",
    final="data",
)


class MMDRecipe(Recipe):
    """MMD-DDM (``--method mmd``).

    Options of :meth:`build`: ``steps`` (4: the DDIM steps fine-tuned for), ``kernel``
    (``"rbf"`` or ``"poly"``), ``degree`` / ``coef`` (polynomial), ``bandwidths`` (RBF;
    None: median heuristic), ``features`` (``"digits"`` or ``"pixels"``), ``gradient``
    (``"remat"`` or ``"backprop"``), ``grid`` / ``final`` (the DDIM grid,
    :func:`jdiff.distill._progressive.student_grid`).
    """

    name = "mmd"
    defaults = _DEFAULTS  # every option of build, with its default (jdiff distill --set)
    paper = "Aiello, Valsesia & Magli, Fast Inference in Denoising Diffusion Models via MMD Finetuning, 2023"

    def build(self, teacher: Teacher, **options) -> Setup:
        """The student (initialized from the teacher) fine-tuned for ``steps`` DDIM
        steps; no frozen parameters.

        Raises:
          DistillError: unknown options or values, digits features on other data.
        """
        o = check_options(self.name, options, _DEFAULTS)
        k = o["steps"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise DistillError(f"mmd: steps must be a positive integer, got {k!r}")
        if o["gradient"] not in _GRADIENTS:
            raise DistillError(f"mmd: gradient must be one of {sorted(_GRADIENTS)}, got {o['gradient']!r}")
        kernel = make_kernel(o["kernel"], degree=int(o["degree"]), coef=float(o["coef"]), bandwidths=o["bandwidths"])
        feats = feature_fn(o["features"], teacher.shape)
        grid = student_grid(teacher.process, k, kind=o["grid"], final=o["final"])
        loss_fn = make_mmd_loss(
            teacher.apply,
            teacher.process,
            grid,
            prediction=teacher.prediction,
            time_input=teacher.time_input,
            features=feats,
            kernel=kernel,
            gradient=_GRADIENTS[o["gradient"]],
        )
        params = jax.tree.map(lambda a: jnp.array(a, copy=True), teacher.params)
        notes = {key: o[key] for key in _DEFAULTS}
        notes.update(method=self.name, network_calls_per_loss=k)
        return Setup(params=params, frozen=None, loss_fn=loss_fn, steps=k, notes=notes)

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
        """Deterministic DDIM with ``steps`` (``<= trained_steps``) network calls."""
        del key
        den = teacher.denoiser(params)
        return ddim_student_sample(
            den, noise, steps=steps, trained_steps=trained_steps, cond=cond, kind=grid, final=final
        )


MMD = MMDRecipe()
