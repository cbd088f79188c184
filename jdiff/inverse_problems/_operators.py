"""Measurement operators of :mod:`jdiff.inverse_problems` and the checks shared by the
posterior samplers (see the package docstring for the operator interface)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._checks import concrete
from jdiff._param import TreeValue
from jdiff._random import normal_per_sample


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
        raise TypeError(f"nonlinear wraps a linear jdiff.inverse_problems operator, got {type(inner).__name__}")
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
        raise TypeError(f"{who}: operator must be a jdiff.inverse_problems Operator, got {type(op).__name__}")
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
