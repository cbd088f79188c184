"""Inverse problems: measurement operators and posterior samplers.

A measurement is ``y = A(x0) + sigma_y n`` with ``n ~ N(0, I)``. The operators below
are small pytrees (frozen dataclasses whose arrays are leaves and whose shapes are
static) with batched methods on ``(B, *x_shape)`` data:

- ``A(x)``, and for linear operators ``AT(y)`` (the adjoint), ``pinv(y)`` (the
  Moore-Penrose pseudo-inverse, singular values below ``rcond * s_max`` treated as 0);
- the SVD ``A = U diag(s) V^T`` as matvecs: ``Vt(x) -> (B, n)``, ``V(z)``,
  ``Ut(y) -> (B, n)``, ``U(z)`` and ``singular_values() -> (n,)`` with ``n`` the data
  size. Spectral coordinates always have length ``n``: ``s`` is 0 past the rank and
  ``Ut`` puts ``U^T y`` on the support of ``s`` (zeros elsewhere), so that
  ``Ut(A x) = s * Vt(x)`` coordinate by coordinate.

Operators: :func:`inpainting` (a pixel mask), :func:`super_resolution` (average pooling
by ``k``), :func:`gaussian_blur` (separable; the SVD from the two per-axis matrices, a
Kronecker product), :func:`random_projection` (an explicit matrix, its SVD computed once
in float64) and :func:`nonlinear` (``tanh`` or ``abs`` of a linear operator; a
phase-retrieval-like magnitude with ``abs``).

Posterior samplers, each ``f(denoiser, operator, y, sigma_y, key, *, nfe, ...)``
returning ``(B, *x_shape)`` restorations (the denoiser carries its process):

- :func:`dps` (Chung et al., ICLR 2023): 1 call per step, with a VJP through the denoiser;
- :func:`pigdm` (Song et al., ICLR 2023): 1 call per step, with a VJP; needs the SVD;
- :func:`ddrm` (Kawar et al., NeurIPS 2022): 1 call per step, no gradients; needs the SVD;
- :func:`red_diff` (Mardani et al., ICLR 2024): 1 call per step, no denoiser VJP (only
  ``A`` is differentiated);
- :func:`dds` (Chung et al., ICLR 2024): 1 call per step, no gradients; CG on ``A^T A``.

All run one ``lax.scan`` over a time grid (built from ``nfe`` like :func:`jdiff.sample`,
ending at the data where the process reaches it), are jit-friendly, take explicit keys
(sample ``i`` draws its noise from ``fold_in(key, i)``: a sample does not depend on the
rest of its batch) and compute every norm, inner product and step size per sample.

:func:`mixture_posterior` gives the exact posterior of a
:class:`~jdiff.testbed.GaussianMixture` prior under a linear Gaussian measurement (again
a Gaussian mixture, with full covariances) and :func:`sample_mixture_posterior` samples it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import concrete
from jdiff._grid import time_grid
from jdiff._param import TreeValue
from jdiff._random import _batch_keys, normal_per_sample
from jdiff._sample import SampleInfo, validate_grid

__all__ = [
    "Operator",
    "Inpainting",
    "SuperResolution",
    "GaussianBlur",
    "RandomProjection",
    "Nonlinear",
    "inpainting",
    "super_resolution",
    "gaussian_blur",
    "random_projection",
    "nonlinear",
    "measure",
    "dps",
    "pigdm",
    "ddrm",
    "red_diff",
    "dds",
    "mixture_posterior",
    "sample_mixture_posterior",
]


def _flat(x):
    return x.reshape(x.shape[0], -1)


def _cast(a, x):
    """A stored (NumPy) array in the compute dtype of ``x``."""
    return jnp.asarray(a, jnp.result_type(x.dtype, jnp.float32))


def _per_sample_dot(a, b):
    return jnp.sum(_flat(a) * _flat(b), axis=1)


def _safe_div(num, den):
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


# ---------------------------------------------------------------------------- operators
class Operator(TreeValue):
    """Base class of the measurement operators (see the module docstring).

    Attributes (of every subclass):
      x_shape: the shape of one data sample (no batch axis).
      y_shape: the shape of one measurement.
      linear: whether ``A`` is linear (``AT``, ``pinv`` exist).
      has_svd: whether the SVD matvecs exist (needed by :func:`ddrm`, :func:`pigdm`).
    """

    linear = True
    has_svd = True
    rcond = 1e-6

    @property
    def n(self) -> int:
        return math.prod(self.x_shape)

    def A(self, x):
        raise NotImplementedError

    def AT(self, y):
        """The adjoint: ``V(s * Ut(y))``."""
        self._need_svd("AT")
        return self.V(self.singular_values().astype(y.dtype) * self.Ut(y))

    def pinv(self, y):
        """The pseudo-inverse ``V diag(1/s) U^T y`` (singular values ``<= rcond * s_max`` dropped)."""
        self._need_svd("pinv")
        s = self.singular_values().astype(y.dtype)
        s = jnp.where(s > self.rcond * jnp.max(s), s, 0)
        return self.V(_safe_div(self.Ut(y), s))

    def singular_values(self):
        raise NotImplementedError

    def Vt(self, x):
        raise NotImplementedError

    def V(self, z):
        raise NotImplementedError

    def Ut(self, y):
        raise NotImplementedError

    def U(self, z):
        raise NotImplementedError

    def _need_svd(self, what):
        if not (self.linear and self.has_svd):
            raise TypeError(f"{type(self).__name__} has no {what}: it is not a linear operator with an SVD")

    def check_data(self, shape, what="data"):
        """Raise ``ValueError`` unless ``shape`` is ``(B, *x_shape)``."""
        if tuple(shape[1:]) != tuple(self.x_shape):
            raise ValueError(
                f"{what} of shape {tuple(shape)} does not fit the operator {type(self).__name__}, "
                f"which acts on samples of shape {tuple(self.x_shape)}"
            )

    def check_measurement(self, shape):
        """Raise ``ValueError`` unless ``shape`` is ``(B, *y_shape)``."""
        if len(shape) < 1 or tuple(shape[1:]) != tuple(self.y_shape):
            raise ValueError(
                f"measurement y of shape {tuple(shape)} does not fit the operator {type(self).__name__}, "
                f"which measures shape (B, {', '.join(map(str, self.y_shape))})"
            )


def _register(cls, data):
    fields = [f.name for f in dataclasses.fields(cls)]
    jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=[f for f in fields if f not in data])
    return cls


def _shape(x_shape, what="x_shape"):
    try:
        s = tuple(int(d) for d in x_shape)
    except TypeError:
        raise TypeError(f"{what} must be a tuple of ints, got {x_shape!r}") from None
    if not s or any(d < 1 for d in s):
        raise ValueError(f"{what} must be a non-empty tuple of positive ints, got {x_shape!r}")
    return s


@dataclasses.dataclass(frozen=True, eq=False)
class Inpainting(Operator):
    """Keep the pixels where ``mask`` is true: ``y = x.flat[idx]`` of shape ``(m,)``.
    Singular values are the 0/1 mask, ``V = I``, ``U`` scatters onto the kept pixels."""

    idx: Any  # (m,) int32 flat indices of the observed entries
    keep: Any  # (n,) float 0/1
    x_shape: tuple = ()

    @property
    def y_shape(self):
        return (int(np.shape(self.idx)[0]),)

    def A(self, x):
        return _flat(x)[:, jnp.asarray(self.idx)]

    def AT(self, y):
        out = jnp.zeros((y.shape[0], self.n), y.dtype).at[:, jnp.asarray(self.idx)].set(y)
        return out.reshape((y.shape[0],) + self.x_shape)

    def pinv(self, y):
        return self.AT(y)

    def singular_values(self):
        return jnp.asarray(self.keep)

    def Vt(self, x):
        return _flat(x)

    def V(self, z):
        return z.reshape((z.shape[0],) + self.x_shape)

    def Ut(self, y):
        return _flat(self.AT(y))

    def U(self, z):
        return z[:, jnp.asarray(self.idx)]


_register(Inpainting, ["idx", "keep"])


def inpainting(mask) -> Inpainting:
    """Inpainting: observe the entries of a sample where ``mask`` (shape ``x_shape``,
    boolean or 0/1) is true.

    Raises:
      ValueError: a mask that observes nothing.
    """
    m = np.asarray(mask)
    if m.ndim == 0:
        raise ValueError(f"the mask must have the shape of one sample, got a scalar {mask!r}")
    keep = m.astype(bool).reshape(-1)
    if not keep.any():
        raise ValueError(f"the inpainting mask of shape {m.shape} observes no entry")
    return Inpainting(np.flatnonzero(keep).astype(np.int32), keep.astype(np.float32), tuple(m.shape))


@dataclasses.dataclass(frozen=True, eq=False)
class SuperResolution(Operator):
    """Average pooling of ``(H, W, C)`` images over ``k x k`` blocks.

    Each block's average is ``(1/k) u^T x_block`` with the unit vector ``u = 1/k``, so
    the singular values are ``1/k`` (one per block and channel) and ``V`` completes
    ``u`` to an orthonormal basis of each block (``Q``, computed once)."""

    Q: Any  # (k*k, k*k) orthogonal, first column ones / k
    x_shape: tuple = ()
    factor: int = 2

    @property
    def y_shape(self):
        H, W, C = self.x_shape
        k = self.factor
        return (H // k, W // k, C)

    def _blocks(self, x):  # (B, H, W, C) -> (B, H/k, W/k, C, k*k)
        B = x.shape[0]
        h, w, C = self.y_shape
        k = self.factor
        return x.reshape(B, h, k, w, k, C).transpose(0, 1, 3, 5, 2, 4).reshape(B, h, w, C, k * k)

    def _unblocks(self, b):
        B = b.shape[0]
        h, w, C = self.y_shape
        k = self.factor
        return b.reshape(B, h, w, C, k, k).transpose(0, 1, 4, 2, 5, 3).reshape((B,) + self.x_shape)

    def A(self, x):
        return jnp.mean(self._blocks(x), axis=-1)

    def AT(self, y):
        k2 = self.factor**2
        return self._unblocks(jnp.repeat(y[..., None], k2, axis=-1) / k2)

    def pinv(self, y):
        return self._unblocks(jnp.repeat(y[..., None], self.factor**2, axis=-1))

    def singular_values(self):
        m = math.prod(self.y_shape)
        return jnp.concatenate([jnp.full((m,), 1.0 / self.factor), jnp.zeros((self.n - m,))])

    def Vt(self, x):
        c = self._blocks(x) @ _cast(self.Q, x)  # (B, h, w, C, k*k)
        return jnp.moveaxis(c, -1, 1).reshape(x.shape[0], -1)

    def V(self, z):
        c = jnp.moveaxis(z.reshape((z.shape[0], self.factor**2) + self.y_shape), 1, -1)
        return self._unblocks(c @ _cast(self.Q, z).T)

    def Ut(self, y):
        f = _flat(y)
        return jnp.concatenate([f, jnp.zeros((y.shape[0], self.n - f.shape[1]), y.dtype)], axis=1)

    def U(self, z):
        m = math.prod(self.y_shape)
        return z[:, :m].reshape((z.shape[0],) + self.y_shape)


_register(SuperResolution, ["Q"])


def super_resolution(x_shape, factor: int = 2) -> SuperResolution:
    """Super-resolution by ``factor x factor`` average pooling of ``(H, W, C)`` images.

    Raises:
      ValueError: a shape that is not ``(H, W, C)`` or not divisible by ``factor``.
    """
    s = _shape(x_shape)
    if len(s) != 3:
        raise ValueError(f"super_resolution acts on (H, W, C) images, got x_shape {s}")
    if not isinstance(factor, (int, np.integer)) or factor < 1 or s[0] % factor or s[1] % factor:
        raise ValueError(f"factor must be a positive int dividing H and W, got {factor!r} for x_shape {s}")
    k2 = int(factor) ** 2
    q, _ = np.linalg.qr(np.concatenate([np.ones((k2, 1)), np.eye(k2)[:, : k2 - 1]], axis=1))
    q = q * np.sign(q[0, 0])  # first column +1/k
    return SuperResolution(q, s, int(factor))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianBlur(Operator):
    """Separable blur ``y = Bh X Bw^T`` per channel of ``(H, W, C)`` images, with the 1-D
    Gaussian kernel matrices ``Bh``, ``Bw`` (zero padding). With ``Bh = Uh Sh Vh^T`` and
    ``Bw = Uw Sw Vw^T``, ``A = (Uh x Uw)(Sh x Sw)(Vh x Vw)^T``: the SVD costs two small
    matrix products per side."""

    Bh: Any
    Bw: Any
    Uh: Any
    sh: Any
    Vh: Any
    Uw: Any
    sw: Any
    Vw: Any
    x_shape: tuple = ()
    std: float = 1.0
    rcond: float = 1e-3

    @property
    def y_shape(self):
        return self.x_shape

    def _apply(self, L, x, R):
        return jnp.einsum("hi,bijc,wj->bhwc", _cast(L, x), x, _cast(R, x))

    def A(self, x):
        return self._apply(self.Bh, x, self.Bw)

    def AT(self, y):
        return self._apply(jnp.asarray(self.Bh).T, y, jnp.asarray(self.Bw).T)

    def singular_values(self):
        s = jnp.asarray(self.sh)[:, None] * jnp.asarray(self.sw)[None, :]
        return jnp.broadcast_to(s[..., None], self.x_shape).reshape(-1)

    def Vt(self, x):
        return _flat(self._apply(jnp.asarray(self.Vh).T, x, jnp.asarray(self.Vw).T))

    def V(self, z):
        return self._apply(self.Vh, z.reshape((z.shape[0],) + self.x_shape), self.Vw)

    def Ut(self, y):
        return _flat(self._apply(jnp.asarray(self.Uh).T, y, jnp.asarray(self.Uw).T))

    def U(self, z):
        return self._apply(self.Uh, z.reshape((z.shape[0],) + self.x_shape), self.Uw)


_register(GaussianBlur, ["Bh", "Bw", "Uh", "sh", "Vh", "Uw", "sw", "Vw"])


def _blur_matrix(size, std, radius):
    """The ``(size, size)`` matrix of a 1-D Gaussian kernel (normalized to sum 1), zero padding."""
    d = np.arange(size)[:, None] - np.arange(size)[None, :]
    norm = np.exp(-0.5 * (np.arange(-radius, radius + 1) / std) ** 2).sum()
    return np.where(np.abs(d) <= radius, np.exp(-0.5 * (d / std) ** 2), 0.0) / norm


def gaussian_blur(x_shape, std: float = 1.0, radius: int | None = None, rcond: float = 1e-3) -> GaussianBlur:
    """A separable Gaussian blur of ``(H, W, C)`` images with standard deviation ``std``
    pixels, kernel radius ``radius`` (default ``ceil(3 std)``), zero padding.

    ``pinv`` drops singular values below ``rcond * s_max``: a Gaussian's smallest singular
    values are tiny (about 5e-5 for std 1 on 8 x 8), so the exact pseudo-inverse would
    amplify measurement noise by that much.

    Raises:
      ValueError: a shape that is not ``(H, W, C)``, ``std`` or ``rcond`` not positive.
    """
    s = _shape(x_shape)
    if len(s) != 3:
        raise ValueError(f"gaussian_blur acts on (H, W, C) images, got x_shape {s}")
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
        raise ValueError(f"std must be a positive finite number, got {std!r}")
    if not (isinstance(rcond, (int, float)) and 0 <= rcond < 1):
        raise ValueError(f"rcond must be in [0, 1), got {rcond!r}")
    r = int(math.ceil(3 * std)) if radius is None else int(radius)
    mats = [_blur_matrix(n, float(std), r) for n in s[:2]]
    svds = [np.linalg.svd(m) for m in mats]
    (Uh, sh, Vht), (Uw, sw, Vwt) = svds
    return GaussianBlur(mats[0], mats[1], Uh, sh, Vht.T, Uw, sw, Vwt.T, s, float(std), float(rcond))


@dataclasses.dataclass(frozen=True, eq=False)
class RandomProjection(Operator):
    """``y = M x.flat`` for an explicit ``(m, n)`` matrix; the SVD (float64, computed
    once) is kept as ``U (m, m)``, ``s`` padded to ``n`` and ``V (n, n)``."""

    M: Any
    Um: Any
    s: Any
    Vm: Any
    x_shape: tuple = ()

    @property
    def y_shape(self):
        return (int(np.shape(self.M)[0]),)

    @property
    def rank(self):
        return min(np.shape(self.M))

    def A(self, x):
        return _flat(x) @ _cast(self.M, x).T

    def AT(self, y):
        return (y @ _cast(self.M, y)).reshape((y.shape[0],) + self.x_shape)

    def singular_values(self):
        return jnp.asarray(self.s)

    def Vt(self, x):
        return _flat(x) @ _cast(self.Vm, x)

    def V(self, z):
        return (z @ _cast(self.Vm, z).T).reshape((z.shape[0],) + self.x_shape)

    def Ut(self, y):
        c = (y @ _cast(self.Um, y))[:, : self.rank]
        return jnp.concatenate([c, jnp.zeros((y.shape[0], self.n - self.rank), c.dtype)], axis=1)

    def U(self, z):
        r = self.rank
        return z[:, :r] @ _cast(self.Um, z)[:, :r].T


_register(RandomProjection, ["M", "Um", "s", "Vm"])


def random_projection(matrix_or_key, x_shape, m: int | None = None) -> RandomProjection:
    """A linear measurement by an explicit matrix: ``random_projection(M, x_shape)`` with
    ``M`` of shape ``(m, prod(x_shape))``, or ``random_projection(key, x_shape, m)`` for
    a Gaussian ``M`` with entries ``N(0, 1/n)``.

    Raises:
      ValueError: a matrix whose columns are not ``prod(x_shape)``, non-finite entries,
        ``m`` missing or not positive with a key.
    """
    s = _shape(x_shape)
    n = math.prod(s)
    a = np.asarray(matrix_or_key) if not isinstance(matrix_or_key, jax.Array) else None
    if isinstance(matrix_or_key, jax.Array) and (
        jax.dtypes.issubdtype(matrix_or_key.dtype, jax.dtypes.prng_key) or matrix_or_key.dtype == jnp.uint32
    ):
        if not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"give the number of measurements m >= 1 with a key, got {m!r}")
        a = np.asarray(jax.random.normal(matrix_or_key, (int(m), n), jnp.float32), np.float64) / math.sqrt(n)
    elif a is None:
        a = np.asarray(matrix_or_key)
    a = np.asarray(a, np.float64)
    if a.ndim != 2 or a.shape[1] != n:
        raise ValueError(f"the matrix must have shape (m, {n}) for x_shape {s}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("the measurement matrix has non-finite entries")
    U, sv, Vt = np.linalg.svd(a, full_matrices=True)
    return RandomProjection(a, U, np.concatenate([sv, np.zeros(n - sv.shape[0])]), Vt.T, s)


_NONLINEAR = {"tanh": jnp.tanh, "abs": jnp.abs}


@dataclasses.dataclass(frozen=True, eq=False)
class Nonlinear(Operator):
    """``y = f(inner.A(x))`` with ``f`` elementwise (``"tanh"``: a saturating sensor;
    ``"abs"``: a magnitude-only measurement, phase retrieval's real analogue)."""

    inner: Any
    fn: str = "tanh"
    linear = False
    has_svd = False

    @property
    def x_shape(self):
        return self.inner.x_shape

    @property
    def y_shape(self):
        return self.inner.y_shape

    def A(self, x):
        return _NONLINEAR[self.fn](self.inner.A(x))

    def AT(self, y):
        self._need_svd("AT")

    def pinv(self, y):
        self._need_svd("pinv")


_register(Nonlinear, ["inner"])


def nonlinear(inner: Operator, fn: str = "tanh") -> Nonlinear:
    """A nonlinear measurement ``fn(inner.A(x))``, ``fn`` in ``("tanh", "abs")``.

    Raises:
      TypeError: ``inner`` not a linear :class:`Operator`; ValueError: unknown ``fn``.
    """
    if not isinstance(inner, Operator) or not inner.linear:
        raise TypeError(f"nonlinear wraps a linear jdiff.inverse operator, got {type(inner).__name__}")
    if fn not in _NONLINEAR:
        raise ValueError(f"unknown nonlinearity {fn!r}; expected one of {tuple(_NONLINEAR)}")
    return Nonlinear(inner, fn)


def measure(operator: Operator, x, sigma_y, key):
    """``y = A(x) + sigma_y n``, sample ``i``'s noise from ``fold_in(key, i)``.

    Raises:
      ValueError: ``x`` not of shape ``(B, *operator.x_shape)``, ``sigma_y`` negative or
        not finite."""
    _check_operator(operator, "measure")
    x = jnp.asarray(x)
    operator.check_data(x.shape, "x")
    sy = _check_sigma_y(sigma_y)
    y = operator.A(x)
    return y + sy * normal_per_sample(key, y.shape, y.dtype)


# ---------------------------------------------------------------------------- checks
def _check_operator(op, who, *, svd=False, linear=False):
    if not isinstance(op, Operator):
        raise TypeError(f"{who}: operator must be a jdiff.inverse Operator, got {type(op).__name__}")
    if svd and not (op.linear and op.has_svd):
        raise TypeError(f"{who} needs a linear operator with an SVD; {type(op).__name__} has none")
    if linear and not op.linear:
        raise TypeError(f"{who} needs a linear operator; {type(op).__name__} is not linear")


def _check_sigma_y(sigma_y):
    v = concrete(sigma_y)
    if v is not None:
        v = np.asarray(v, np.float64)
        if v.ndim != 0 or not np.isfinite(v) or v < 0:
            raise ValueError(f"the measurement noise level sigma_y must be a finite number >= 0, got {sigma_y!r}")
    return sigma_y


def _check_number(name, value, *, lo=None, hi=None, lo_open=False):
    """A finite Python number within bounds, else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}")
    return v


def _prepare(who, denoiser, operator, y, sigma_y, key, x_T, grid, nfe, grid_kind, *, svd=False, linear=False):
    """Validate the common inputs; returns ``(y, grid, keys, x_shape)``."""
    _check_operator(operator, who, svd=svd, linear=linear)
    process = getattr(denoiser, "process", None)
    if process is None or not callable(denoiser):
        raise TypeError(f"{who}: denoiser must be a jdiff Denoiser (see jdiff.denoiser)")
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise TypeError(f"{who}: y must be floating point, got {y.dtype}")
    operator.check_measurement(y.shape)
    _check_sigma_y(sigma_y)
    B = y.shape[0]
    shape = (B,) + tuple(operator.x_shape)
    if x_T is not None:
        x_T = jnp.asarray(x_T)
        operator.check_data(x_T.shape, "x_T")
        if x_T.shape[0] != B:
            raise ValueError(f"{who}: x_T has batch {x_T.shape[0]}, y has batch {B}")
    if key is None:
        raise ValueError(f"{who} is stochastic: pass key=jax.random.key(seed)")
    if grid is None:
        if nfe is None:
            raise ValueError(f"{who}: give a time grid or nfe")
        if not isinstance(nfe, (int, np.integer)) or nfe < 1:
            raise ValueError(f"{who}: nfe must be a positive int, got {nfe!r}")
        final = "data" if process.t_data is not None else "t_min"
        grid = time_grid(process, int(nfe), kind=grid_kind, final=final, dtype=jnp.result_type(y.dtype, jnp.float32))
    grid = validate_grid(process, grid)
    keys = _batch_keys(key, B)
    return y, grid, keys, shape, x_T


def _tables(process, grid, eta):
    """alpha, sigma at the grid points and the DDIM noise ``c`` of each step (Song et al.,
    2021, Eq. 16 in alpha/sigma form): ``c = eta sigma_next sqrt(1 - exp(2 (lam - lam_next)))``."""
    a, s, lam = process.alpha(grid), process.sigma(grid), process.lambda_(grid)
    c = eta * s[1:] * jnp.sqrt(-jnp.expm1(2 * jnp.minimum(lam[:-1] - lam[1:], 0)))
    return a, s, c


def _ddim(x0, eps, a_next, s_next, c, z):
    return a_next * x0 + jnp.sqrt(jnp.maximum(s_next**2 - c**2, 0)) * eps + c * z


def _prior(process, keys, shape, dtype, x_T):
    if x_T is not None:
        return x_T.astype(dtype)
    return (normal_per_sample(keys, shape, dtype, step=2**31 - 1) * process.prior_std()).astype(dtype)


def _finish(x, grid, N, return_info):
    return (x, SampleInfo(nfe=jnp.asarray(N, jnp.int32), grid=grid)) if return_info else x


# ---------------------------------------------------------------------------- DPS
def dps(
    denoiser,
    operator,
    y,
    sigma_y,
    key,
    *,
    nfe: int = 1000,
    scale: float = 1.0,
    eta: float = 1.0,
    cond=None,
    grid=None,
    grid_kind: str = "default",
    x_T=None,
    return_info: bool = False,
):
    """Diffusion posterior sampling (Chung, Kim, Mccann, Klasky & Ye, "Diffusion Posterior
    Sampling for General Noisy Inverse Problems", ICLR 2023, Algorithm 1).

    Each step takes the ancestral (DDIM ``eta``; 1 = DDPM) step from the Tweedie estimate
    ``x0_hat(x_t)`` and then ``x <- x - scale * grad_{x_t} ||y - A(x0_hat(x_t))||``: the
    paper's step ``zeta_i = zeta' / ||y - A x0_hat||`` on the squared residual is this
    gradient of the norm. The norm is per sample (the reference code takes it over the
    whole batch, which couples the samples). Works for nonlinear ``A``.

    NFE: one denoiser call per step, **with a VJP** through the denoiser (about 2-3 times a
    forward call). Usual NFE: 1000 (paper).

    Args:
      denoiser: a :class:`~jdiff.Denoiser` (its ``process`` defines the noise levels).
      operator: a :class:`Operator` acting on samples of shape ``operator.x_shape``.
      y: ``(B, *operator.y_shape)`` measurements; ``sigma_y``: their noise std (>= 0).
      key: PRNG key (one, or one per sample).
      nfe: model calls (= steps); or ``grid``: an explicit decreasing time grid.
      cond: passed to the denoiser (e.g. the null class of a class-conditional model).
      x_T: optional starting noise ``(B, *x_shape)``.
      return_info: also return a :class:`~jdiff.SampleInfo` (``nfe``, ``grid``).
      scale: the step ``zeta'`` (finite, >= 0); eta: DDIM noise in [0, 1].

    Returns:
      ``(B, *x_shape)`` restorations (and the info).

    Raises:
      ValueError: shapes that do not fit the operator, ``sigma_y`` < 0 or not finite,
        ``scale``/``eta`` not finite or out of range, no key, a bad grid.
      TypeError: not an :class:`Operator` or not a denoiser.
    """
    scale = _check_number("dps: scale", scale, lo=0)
    eta = _check_number("dps: eta", eta, lo=0, hi=1)
    y, grid, keys, shape, x_T = _prepare("dps", denoiser, operator, y, sigma_y, key, x_T, grid, nfe, grid_kind)
    x = _dps_run(denoiser, operator, y, grid, keys, cond, x_T, scale, eta, shape)
    return _finish(x, grid, grid.shape[0] - 1, return_info)


@functools.partial(jax.jit, static_argnames=("shape",))
def _dps_run(den, op, y, grid, keys, cond, x_T, scale, eta, shape):
    dt = jnp.result_type(y.dtype, jnp.float32)
    process = den.process
    a, s, c = _tables(process, grid, eta)
    x = _prior(process, keys, shape, dt, x_T)

    def body(x, i):
        t = grid[i]

        def norms(x):
            p = den(x, t, cond)
            r = _flat(y - op.A(p.x0.astype(dt)))
            # sqrt(sum r^2 + tiny): the gradient stays finite at an exact fit
            return jnp.sqrt(jnp.sum(r * r, axis=1) + jnp.finfo(dt).tiny), p

        nrm, vjp, p = jax.vjp(norms, x, has_aux=True)
        (g,) = vjp(jnp.ones_like(nrm))
        z = normal_per_sample(keys, shape, dt, step=i)
        x_next = _ddim(p.x0.astype(dt), p.eps.astype(dt), a[i + 1], s[i + 1], c[i], z) - scale * g
        return x_next, None

    x, _ = jax.lax.scan(body, x, jnp.arange(grid.shape[0] - 1))
    return x


# ---------------------------------------------------------------------------- PiGDM
def pigdm(
    denoiser,
    operator,
    y,
    sigma_y,
    key,
    *,
    nfe: int = 100,
    scale: float = 1.0,
    eta: float = 1.0,
    cond=None,
    grid=None,
    grid_kind: str = "default",
    x_T=None,
    return_info: bool = False,
):
    """Pseudoinverse-guided diffusion (Song, Vahdat, Mardani & Kautz, "Pseudoinverse-Guided
    Diffusion Models for Inverse Problems", ICLR 2023, Eq. 7 and Algorithm 1).

    With ``p(x0 | x_t) ~ N(x0_hat, r_t^2 I)``, ``r_t^2 = sigma^2 / (alpha^2 + sigma^2)``,
    the likelihood score is ``g = (d x0_hat / d x_t)^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1}
    (y - A x0_hat)`` (computed through the SVD, one VJP). The guided Tweedie estimate
    ``x0_hat + scale * sigma^2 / alpha * g`` (and its eps) drives a DDIM step with ``eta``.
    With ``sigma_y = 0`` the inner inverse is ``A^+``, as in the paper's noiseless case.

    NFE: one denoiser call per step **with a VJP**. Usual NFE: 100 (paper).

    Args:
      denoiser: a :class:`~jdiff.Denoiser` (its ``process`` defines the noise levels).
      operator: a :class:`Operator` acting on samples of shape ``operator.x_shape``.
      y: ``(B, *operator.y_shape)`` measurements; ``sigma_y``: their noise std (>= 0).
      key: PRNG key (one, or one per sample).
      nfe: model calls (= steps); or ``grid``: an explicit decreasing time grid.
      cond: passed to the denoiser (e.g. the null class of a class-conditional model).
      x_T: optional starting noise ``(B, *x_shape)``.
      return_info: also return a :class:`~jdiff.SampleInfo` (``nfe``, ``grid``).
      scale: guidance weight (finite, >= 0); eta: DDIM noise in [0, 1].

    Returns:
      ``(B, *x_shape)`` restorations (and the info).

    Raises:
      ValueError: as :func:`dps`. TypeError: an operator without an SVD.
    """
    scale = _check_number("pigdm: scale", scale, lo=0)
    eta = _check_number("pigdm: eta", eta, lo=0, hi=1)
    y, grid, keys, shape, x_T = _prepare(
        "pigdm", denoiser, operator, y, sigma_y, key, x_T, grid, nfe, grid_kind, svd=True
    )
    x = _pigdm_run(denoiser, operator, y, jnp.asarray(sigma_y), grid, keys, cond, x_T, scale, eta, shape)
    return _finish(x, grid, grid.shape[0] - 1, return_info)


@functools.partial(jax.jit, static_argnames=("shape",))
def _pigdm_run(den, op, y, sigma_y, grid, keys, cond, x_T, scale, eta, shape):
    dt = jnp.result_type(y.dtype, jnp.float32)
    process = den.process
    a, s, c = _tables(process, grid, eta)
    sv = op.singular_values().astype(dt)
    sy2 = jnp.asarray(sigma_y, dt) ** 2
    x = _prior(process, keys, shape, dt, x_T)

    def body(x, i):
        t = grid[i]
        x0, vjp, p = jax.vjp(lambda x: (lambda p: (p.x0.astype(dt), p))(den(x, t, cond)), x, has_aux=True)
        r2 = s[i] ** 2 / (a[i] ** 2 + s[i] ** 2)
        resid = op.Ut(y - op.A(x0))
        h = op.V(_safe_div(sv * resid, r2 * sv * sv + sy2))  # A^T (r^2 A A^T + sy^2)^-1 (y - A x0)
        (g,) = vjp(h)
        x0g = x0 + scale * s[i] ** 2 / a[i] * g
        epsg = p.eps.astype(dt) - scale * s[i] * g
        z = normal_per_sample(keys, shape, dt, step=i)
        return _ddim(x0g, epsg, a[i + 1], s[i + 1], c[i], z), None

    x, _ = jax.lax.scan(body, x, jnp.arange(grid.shape[0] - 1))
    return x


# ---------------------------------------------------------------------------- DDRM
def ddrm(
    denoiser,
    operator,
    y,
    sigma_y,
    key,
    *,
    nfe: int = 20,
    eta: float = 0.85,
    eta_b: float = 1.0,
    cond=None,
    grid=None,
    grid_kind: str = "default",
    x_T=None,
    return_info: bool = False,
):
    """Denoising diffusion restoration models (Kawar, Elad, Ermon & Song, "Denoising
    Diffusion Restoration Models", NeurIPS 2022, Eq. 7-8).

    In the spectral coordinates ``xbar = V^T x / alpha`` (noise level ``rho = sigma /
    alpha``) and ``ybar = U^T y / s`` (noise ``sigma_y / s_i``), each coordinate moves from
    the Tweedie estimate: unobserved ones (``s_i = 0``) by DDIM with ``eta``; observed ones
    whose measurement is noisier than the target level (``rho < sigma_y / s_i``) towards
    ``ybar`` with ``eta``; the others to ``(1 - eta_b) x0_hat + eta_b ybar`` plus fresh noise
    of variance ``rho^2 - eta_b^2 sigma_y^2 / s_i^2``. The start is the paper's
    ``ybar + noise`` on observed coordinates. With ``sigma_y = 0`` and ``eta_b = 1`` on a
    grid ending at the data, ``A x = y`` exactly (to rounding).

    NFE: one denoiser call per step, **no gradients** (needs the SVD). Usual NFE: 20 (paper).

    Args:
      denoiser: a :class:`~jdiff.Denoiser` (its ``process`` defines the noise levels).
      operator: a :class:`Operator` acting on samples of shape ``operator.x_shape``.
      y: ``(B, *operator.y_shape)`` measurements; ``sigma_y``: their noise std (>= 0).
      key: PRNG key (one, or one per sample).
      nfe: model calls (= steps); or ``grid``: an explicit decreasing time grid.
      cond: passed to the denoiser (e.g. the null class of a class-conditional model).
      x_T: optional starting noise ``(B, *x_shape)``.
      return_info: also return a :class:`~jdiff.SampleInfo` (``nfe``, ``grid``).
      eta, eta_b: the paper's ``eta`` and ``eta_b`` in [0, 1].

    Returns:
      ``(B, *x_shape)`` restorations (and the info).

    Raises:
      ValueError: as :func:`dps`, and a grid starting where ``alpha = 0`` (infinite
        ``rho``: start it below ``t_max``). TypeError: an operator without an SVD.
    """
    eta = _check_number("ddrm: eta", eta, lo=0, hi=1)
    eta_b = _check_number("ddrm: eta_b", eta_b, lo=0, hi=1)
    y, grid, keys, shape, x_T = _prepare(
        "ddrm", denoiser, operator, y, sigma_y, key, x_T, grid, nfe, grid_kind, svd=True
    )
    g0 = concrete(grid)
    if g0 is not None and not np.isfinite(float(denoiser.process.rho(jnp.asarray(g0[0])))):
        raise ValueError(f"ddrm: the grid starts at t = {float(g0[0])} where alpha = 0; start it below t_max")
    x = _ddrm_run(denoiser, operator, y, jnp.asarray(sigma_y), grid, keys, cond, x_T, eta, eta_b, shape)
    return _finish(x, grid, grid.shape[0] - 1, return_info)


@functools.partial(jax.jit, static_argnames=("shape",))
def _ddrm_run(den, op, y, sigma_y, grid, keys, cond, x_T, eta, eta_b, shape):
    dt = jnp.result_type(y.dtype, jnp.float32)
    process = den.process
    a, s = process.alpha(grid).astype(dt), process.sigma(grid).astype(dt)
    rho = s / a
    sv = op.singular_values().astype(dt)
    sy = jnp.asarray(sigma_y, dt)
    obs = sv > 0
    ybar = _safe_div(op.Ut(y.astype(dt)), sv)  # (B, n)
    ny = _safe_div(sy, sv)  # the noise level of each observed coordinate
    B, n = y.shape[0], sv.shape[0]

    if x_T is None:
        z = normal_per_sample(keys, (B, n), dt, step=2**31 - 1)
        clean = obs & (rho[0] >= ny)
        xb = jnp.where(clean, ybar + jnp.sqrt(jnp.maximum(rho[0] ** 2 - ny**2, 0)) * z, rho[0] * z)
        x = a[0] * op.V(xb)
    else:
        x = x_T.astype(dt)

    def body(x, i):
        p = den(x, grid[i], cond)
        x0b, epsb = op.Vt(p.x0.astype(dt)), op.Vt(p.eps.astype(dt))
        rn = rho[i + 1]
        z = normal_per_sample(keys, (B, n), dt, step=i)
        k = jnp.sqrt(1 - eta**2)
        free = x0b + k * rn * epsb + eta * rn * z
        noisy = x0b + k * rn * _safe_div(ybar - x0b, ny) + eta * rn * z
        clean = (1 - eta_b) * x0b + eta_b * ybar + jnp.sqrt(jnp.maximum(rn**2 - (eta_b * ny) ** 2, 0)) * z
        xb = jnp.where(~obs, free, jnp.where(rn < ny, noisy, clean))
        return a[i + 1] * op.V(xb), None

    x, _ = jax.lax.scan(body, x, jnp.arange(grid.shape[0] - 1))
    return x / a[-1]


# ---------------------------------------------------------------------------- RED-diff
def red_diff(
    denoiser,
    operator,
    y,
    sigma_y,
    key,
    *,
    nfe: int = 1000,
    lam: float = 0.25,
    lr: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.99,
    cond=None,
    grid=None,
    grid_kind: str = "default",
    mu_init=None,
    return_info: bool = False,
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
    is per sample and Adam is elementwise, so samples are independent.

    NFE: one denoiser call per step, **no VJP through the denoiser** (the regularizer's
    gradient is the stopped ``eps_hat - eps``; only ``A`` is differentiated). Usual NFE:
    1000 (paper).

    Args:
      denoiser: a :class:`~jdiff.Denoiser` (its ``process`` defines the noise levels).
      operator: a :class:`Operator` acting on samples of shape ``operator.x_shape``.
      y: ``(B, *operator.y_shape)`` measurements; ``sigma_y``: their noise std (>= 0).
      key: PRNG key (one, or one per sample).
      nfe: model calls (= steps); or ``grid``: an explicit decreasing time grid.
      cond: passed to the denoiser (e.g. the null class of a class-conditional model).
      mu_init: optional ``(B, *x_shape)`` starting point of ``mu``.
      return_info: also return a :class:`~jdiff.SampleInfo` (``nfe``, ``grid``).
      lam: regularization weight (finite, >= 0); lr, b1, b2: Adam's settings.

    Returns:
      ``(B, *x_shape)`` the final ``mu`` (and the info; its grid's first N points are the
      times used).

    Raises:
      ValueError: as :func:`dps`, and ``lr`` not positive or ``b1``/``b2`` outside [0, 1).
    """
    lam = _check_number("red_diff: lam", lam, lo=0)
    lr = _check_number("red_diff: lr", lr, lo=0, lo_open=True)
    b1 = _check_number("red_diff: b1", b1, lo=0, hi=1)
    b2 = _check_number("red_diff: b2", b2, lo=0, hi=1)
    if b1 >= 1 or b2 >= 1:
        raise ValueError(f"red_diff: b1 and b2 must be < 1, got {b1}, {b2}")
    y, grid, keys, shape, mu = _prepare("red_diff", denoiser, operator, y, sigma_y, key, mu_init, grid, nfe, grid_kind)
    if mu is None:
        mu = operator.pinv(y) if operator.linear else jnp.zeros(shape, y.dtype)
    x = _red_run(denoiser, operator, y, grid, keys, cond, mu, lam, lr, b1, b2, shape)
    return _finish(x, grid, grid.shape[0] - 1, return_info)


@functools.partial(jax.jit, static_argnames=("shape", "b1", "b2"))
def _red_run(den, op, y, grid, keys, cond, mu, lam, lr, b1, b2, shape):
    import optax

    dt = jnp.result_type(y.dtype, jnp.float32)
    process = den.process
    a, s = process.alpha(grid).astype(dt), process.sigma(grid).astype(dt)
    opt = optax.adam(lr, b1=b1, b2=b2)
    mu = mu.astype(dt)

    def data_loss(mu):
        r = y - op.A(mu)
        return 0.5 * jnp.sum(r * r)

    def body(carry, i):
        mu, st = carry
        z = normal_per_sample(keys, shape, dt, step=i)
        p = den(a[i] * mu + s[i] * z, grid[i], cond)
        reg = jax.lax.stop_gradient(p.eps.astype(dt) - z)
        grad = jax.grad(data_loss)(mu) + lam * (s[i] / a[i]) * reg
        upd, st = opt.update(grad, st, mu)
        return (optax.apply_updates(mu, upd), st), None

    (mu, _), _ = jax.lax.scan(body, (mu, opt.init(mu)), jnp.arange(grid.shape[0] - 1))
    return mu


# ---------------------------------------------------------------------------- DDS
def _cg(apply, b, x, steps):
    """``steps`` conjugate-gradient iterations on ``apply(x) = b`` (symmetric PSD), every
    inner product and step size per sample."""
    shp = (-1,) + (1,) * (x.ndim - 1)
    r = b - apply(x)
    p = r
    rs = _per_sample_dot(r, r)

    def it(_, carry):
        x, r, p, rs = carry
        Ap = apply(p)
        alpha = _safe_div(rs, _per_sample_dot(p, Ap)).reshape(shp)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = _per_sample_dot(r, r)
        p = r + _safe_div(rs_new, rs).reshape(shp) * p
        return x, r, p, rs_new

    return jax.lax.fori_loop(0, steps, it, (x, r, p, rs))[0]


def dds(
    denoiser,
    operator,
    y,
    sigma_y,
    key,
    *,
    nfe: int = 50,
    cg_steps: int = 5,
    gamma: float = 0.0,
    eta: float = 0.15,
    cond=None,
    grid=None,
    grid_kind: str = "default",
    x_T=None,
    return_info: bool = False,
):
    """Decomposed diffusion sampler (Chung, Lee & Ye, "Decomposed Diffusion Sampler for
    Accelerating Large-Scale Inverse Problems", ICLR 2024, Algorithm 1).

    At each step the Tweedie estimate ``x0_hat`` is refined by ``cg_steps`` conjugate-gradient
    iterations on ``(A^T A + gamma I) x = A^T y + gamma x0_hat`` started at ``x0_hat`` (a
    Krylov step that stays on the data manifold's tangent; ``gamma > 0`` is the proximal
    variant for noisy data), and a DDIM step with ``eta`` renoises it with the network's eps.
    The CG inner products and step sizes are per sample.

    NFE: one denoiser call per step, **no gradients** (``A`` and ``A^T`` only). Usual NFE:
    50 (paper: 50-100).

    Args:
      denoiser: a :class:`~jdiff.Denoiser` (its ``process`` defines the noise levels).
      operator: a :class:`Operator` acting on samples of shape ``operator.x_shape``.
      y: ``(B, *operator.y_shape)`` measurements; ``sigma_y``: their noise std (>= 0).
      key: PRNG key (one, or one per sample).
      nfe: model calls (= steps); or ``grid``: an explicit decreasing time grid.
      cond: passed to the denoiser (e.g. the null class of a class-conditional model).
      x_T: optional starting noise ``(B, *x_shape)``.
      return_info: also return a :class:`~jdiff.SampleInfo` (``nfe``, ``grid``).
      cg_steps: CG iterations per step (int >= 0); gamma: proximal weight (>= 0); eta: DDIM
        noise in [0, 1].

    Returns:
      ``(B, *x_shape)`` restorations (and the info).

    Raises:
      ValueError: as :func:`dps`. TypeError: a nonlinear operator.
    """
    if isinstance(cg_steps, bool) or not isinstance(cg_steps, (int, np.integer)) or cg_steps < 0:
        raise ValueError(f"dds: cg_steps must be an int >= 0, got {cg_steps!r}")
    gamma = _check_number("dds: gamma", gamma, lo=0)
    eta = _check_number("dds: eta", eta, lo=0, hi=1)
    y, grid, keys, shape, x_T = _prepare(
        "dds", denoiser, operator, y, sigma_y, key, x_T, grid, nfe, grid_kind, linear=True
    )
    x = _dds_run(denoiser, operator, y, grid, keys, cond, x_T, gamma, eta, int(cg_steps), shape)
    return _finish(x, grid, grid.shape[0] - 1, return_info)


@functools.partial(jax.jit, static_argnames=("shape", "cg_steps"))
def _dds_run(den, op, y, grid, keys, cond, x_T, gamma, eta, cg_steps, shape):
    dt = jnp.result_type(y.dtype, jnp.float32)
    process = den.process
    a, s, c = _tables(process, grid, eta)
    x = _prior(process, keys, shape, dt, x_T)
    ATy = op.AT(y.astype(dt))

    def body(x, i):
        p = den(x, grid[i], cond)
        x0 = p.x0.astype(dt)
        x0 = _cg(lambda v: op.AT(op.A(v)) + gamma * v, ATy + gamma * x0, x0, cg_steps)
        z = normal_per_sample(keys, shape, dt, step=i)
        return _ddim(x0, p.eps.astype(dt), a[i + 1], s[i + 1], c[i], z), None

    x, _ = jax.lax.scan(body, x, jnp.arange(grid.shape[0] - 1))
    return x


# ---------------------------------------------------------------------------- exact posterior
def mixture_posterior(mixture, operator, y, sigma_y):
    """The exact posterior of a Gaussian-mixture prior under ``y = A x + sigma_y n``.

    For ``p(x) = sum_k pi_k N(mu_k, D_k)`` (``D_k`` diagonal) and linear ``A``, Bayes' rule
    component by component gives a mixture of full-covariance Gaussians (the Kalman update):
    with ``S_k = A D_k A^T + sigma_y^2 I`` and ``G_k = D_k A^T S_k^{-1}``,

        mean_k = mu_k + G_k (y - A mu_k),   cov_k = D_k - G_k A D_k,
        w_k  ~  pi_k N(y; A mu_k, S_k).

    This form holds for ``sigma_y = 0`` as long as ``A D_k A^T`` is invertible.

    Args:
      mixture: a :class:`jdiff.testbed.GaussianMixture` with ``d = prod(operator.x_shape)``.
      operator: a linear :class:`Operator`; its matrix is built column by column from ``A``.
      y: one measurement of shape ``operator.y_shape`` (no batch axis).
      sigma_y: its noise std (>= 0).

    Returns:
      ``(weights (K,), means (K, d), covs (K, d, d))`` NumPy float64.

    Raises:
      ValueError: dimension mismatch, bad ``sigma_y``; TypeError: nonlinear operator.
    """
    _check_operator(operator, "mixture_posterior", linear=True)
    sy = float(_check_number("mixture_posterior: sigma_y", float(np.asarray(sigma_y)), lo=0))
    d = mixture.dim
    if operator.n != d:
        raise ValueError(f"the mixture has dimension {d}, the operator acts on {operator.x_shape}")
    with jax.ensure_compile_time_eval():
        eye = jnp.eye(d, dtype=jnp.float32).reshape((d,) + tuple(operator.x_shape))
        A = np.asarray(_flat(operator.A(eye)), np.float64).T  # (m, d)
    yv = np.asarray(y, np.float64).reshape(-1)
    if yv.shape[0] != A.shape[0]:
        raise ValueError(f"y of shape {np.shape(y)} does not fit the operator's y_shape {operator.y_shape}")
    m = A.shape[0]
    logw, means, covs = [], [], []
    for pi, mu, sd in zip(mixture.weights, mixture.means, mixture.stds):
        D = np.diag(sd**2)
        S = A @ D @ A.T + sy**2 * np.eye(m)
        G = np.linalg.solve(S, A @ D).T
        r = yv - A @ mu
        means.append(mu + G @ r)
        c = D - G @ A @ D
        covs.append(0.5 * (c + c.T))
        _, logdet = np.linalg.slogdet(S)
        logw.append(np.log(pi) - 0.5 * (r @ np.linalg.solve(S, r) + logdet + m * np.log(2 * np.pi)))
    logw = np.asarray(logw)
    w = np.exp(logw - logw.max())
    return w / w.sum(), np.asarray(means), np.asarray(covs)


def sample_mixture_posterior(key, posterior, n: int):
    """``n`` exact samples of ``(weights, means, covs)`` from :func:`mixture_posterior`
    (NumPy float64; a component by its weight, then ``mean + L z`` with ``cov = L L^T``
    from an eigendecomposition, so singular covariances work)."""
    w, means, covs = posterior
    kc, kz = jax.random.split(key)
    comp = np.asarray(jax.random.choice(kc, len(w), (n,), p=jnp.asarray(w, jnp.float32)))
    z = np.asarray(jax.random.normal(kz, (n, means.shape[1])), np.float64)
    ev, evec = np.linalg.eigh(covs)
    L = evec * np.sqrt(np.maximum(ev, 0))[:, None, :]
    return means[comp] + np.einsum("nij,nj->ni", L[comp], z)
