"""The empirical model statistics (EMS) of DPM-Solver-v3 (Zheng et al., NeurIPS 2023,
Sec. 3.2): :class:`ModelStatistics`, computed by :func:`model_statistics`, saved and
read back by :meth:`ModelStatistics.save` / :func:`load_statistics`. The solver that
uses them is :mod:`jdiff.solvers.dpm_solver_v3`."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ModelStatistics", "model_statistics", "load_statistics"]

_KIND = "jdiff-dpm-solver-v3-statistics"


@dataclasses.dataclass(frozen=True, eq=False)
class ModelStatistics:
    """Empirical model statistics of DPM-Solver-v3 for one model and process.

    Equal and hashed by content (a SHA-1 of the arrays, the process and the model tag,
    taken once at construction), so a solver holding them is a hashable value and the
    same statistics loaded twice give equal solvers that share one compiled program.

    Attributes:
      lam: ``(M + 1,)`` increasing log-SNR points.
      l, s, b: ``(M + 1, *shape)`` the statistics at those points (numpy, float64).
      process: the name of the process they were computed for.
      model: a free-form tag naming the model (checked on load when given).
    """

    lam: Any
    l: Any  # noqa: E741 (the paper's name)
    s: Any
    b: Any
    process: str
    model: str = ""

    def __post_init__(self):
        lam = np.asarray(self.lam, np.float64)
        arrs = [np.asarray(a, np.float64) for a in (self.l, self.s, self.b)]
        if lam.ndim != 1 or lam.shape[0] < 2 or not np.all(np.isfinite(lam)) or np.any(np.diff(lam) <= 0):
            raise ValueError(
                f"statistics lam must be finite, increasing, with at least 2 points; got shape {lam.shape}"
            )
        for name, a in zip("lsb", arrs):
            if a.shape[:1] != lam.shape or a.ndim < 2:
                raise ValueError(f"statistics {name} must have shape ({lam.shape[0]}, *sample_shape), got {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"statistics {name} has non-finite values")
        if not (arrs[0].shape == arrs[1].shape == arrs[2].shape):
            raise ValueError(f"statistics l, s, b shapes differ: {[a.shape for a in arrs]}")
        object.__setattr__(self, "lam", lam)
        for name, a in zip("lsb", arrs):
            object.__setattr__(self, name, a)
        h = hashlib.sha1()
        for a in (lam, *arrs):
            h.update(repr(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(f"{self.process}\0{self.model}".encode())
        object.__setattr__(self, "_digest", h.hexdigest())

    def __eq__(self, other):
        return isinstance(other, ModelStatistics) and self._digest == other._digest

    def __hash__(self):
        return hash(self._digest)

    @property
    def shape(self) -> tuple:
        """The shape of one sample."""
        return tuple(self.l.shape[1:])

    @classmethod
    def degenerate(cls, lam, shape, process: str, model: str = "") -> ModelStatistics:
        """``l = 1, s = b = 0``: DPM-Solver-v3 is then DPM-Solver++ (see the module)."""
        lam = np.asarray(lam, np.float64)
        one = np.ones((lam.shape[0],) + tuple(shape))
        return cls(lam, one, np.zeros_like(one), np.zeros_like(one), process, model)

    def save(self, path) -> None:
        """Write the statistics to ``path`` (``.npz``) with their process and model tag."""
        np.savez(
            path,
            kind=_KIND,
            lam=self.lam,
            l=self.l,
            s=self.s,
            b=self.b,
            process=self.process,
            model=self.model,
        )


def load_statistics(path, *, process=None, shape=None, model: str | None = None) -> ModelStatistics:
    """Read statistics saved by :meth:`ModelStatistics.save`, refusing a mismatch.

    Args:
      path: the ``.npz`` file.
      process: the process (or its name) they must have been computed for.
      shape: the sample shape they must have.
      model: the model tag they must carry.

    Raises:
      ValueError: not a statistics file, or one made for another process, sample
        shape or model (the message names both).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            if "kind" not in z or str(z["kind"]) != _KIND:
                raise ValueError(f"{path} is not a DPM-Solver-v3 statistics file")
            st = ModelStatistics(z["lam"], z["l"], z["s"], z["b"], str(z["process"]), str(z["model"]))
    except (ValueError, KeyError) as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a DPM-Solver-v3 statistics file ({e})") from None
    want = getattr(process, "name", process)
    if want is not None and st.process != want:
        raise ValueError(f"{path}: statistics computed for process {st.process!r}, not {want!r}")
    if shape is not None and st.shape != tuple(shape):
        raise ValueError(f"{path}: statistics for samples of shape {st.shape}, not {tuple(shape)}")
    if model is not None and st.model != model:
        raise ValueError(f"{path}: statistics computed for model {st.model!r}, not {model!r}")
    return st


def _along_lambda(process):
    """``lambda -> (t, alpha, sigma)`` and its derivative in lambda (JVP)."""

    def curves(lam):
        t = process.t_of_lambda(lam)
        return t, process.alpha(t), process.sigma(t)

    return curves


def model_statistics(
    denoiser,
    data,
    *,
    key,
    num_lambdas: int = 101,
    lambda_range=None,
    ridge: float = 1e-8,
    model: str = "",
) -> ModelStatistics:
    """Compute DPM-Solver-v3's empirical model statistics (Zheng et al. 2023, Sec. 3.2).

    At each of ``num_lambdas`` log-SNR points uniform in ``lambda_range``, the samples
    ``x = alpha x0 + sigma z`` (``x0`` the rows of ``data``, ``z`` standard normal) give

    - ``l = mean(sigma v * (J_eps v))``, ``v`` Rademacher (one JVP per sample), the
      diagonal of ``E[sigma grad_x eps]``;
    - ``s, b``: per dimension, the least-squares line ``f' = s f + b`` with
      ``f = (sigma eps - l x) / alpha`` and ``f'`` its derivative along the ODE (one JVP
      per sample; ``dl/dlambda`` from the ``l`` grid by central differences).
      ``s = cov(f, f') / (var(f) + ridge * mean(f^2))``.

    Args:
      denoiser: a jdiff denoiser (``.process`` and ``(x, t, cond) -> Prediction``).
      data: ``(n, *shape)`` samples of the data, or of the model's own outputs.
      key: PRNG key for ``z`` and ``v``.
      num_lambdas: grid points (at least 3).
      lambda_range: ``(lambda_min, lambda_max)``; default the process's ``lambda(t_max)``
        and ``lambda(t_min)`` (they must be finite).
      ridge: relative regularization of the ``s`` regression (a dimension whose ``f``
        does not vary gets ``s = 0``).
      model: a tag stored with the statistics.

    Returns:
      :class:`ModelStatistics`.

    Raises:
      ValueError: fewer than 3 points, fewer than 2 samples, or an infinite range.
    """
    process = denoiser.process
    data = jnp.asarray(data)
    if not jnp.issubdtype(data.dtype, jnp.floating) or data.ndim < 2 or data.shape[0] < 2:
        raise ValueError(f"data must be floating point (n >= 2, *shape), got {data.dtype} {data.shape}")
    if int(num_lambdas) < 3:
        raise ValueError(f"num_lambdas must be at least 3, got {num_lambdas}")
    if lambda_range is None:
        lo = float(process.lambda_(jnp.asarray(process.t_max, jnp.float64)))
        hi = float(process.lambda_(jnp.asarray(process.t_min, jnp.float64)))
    else:
        lo, hi = (float(v) for v in lambda_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"the statistics need a finite lambda range lo < hi, got ({lo}, {hi}); pass lambda_range")
    dt = jnp.result_type(data.dtype, jnp.float32)
    data = data.astype(dt)
    lams = jnp.linspace(lo, hi, int(num_lambdas), dtype=dt)
    curves = _along_lambda(process)

    def point(lam, k):
        (t, a, s), (_, da, _) = jax.jvp(curves, (lam,), (jnp.ones_like(lam),))
        kz, kv = jax.random.split(k)
        x = a * data + s * jax.random.normal(kz, data.shape, dt)
        v = jax.random.rademacher(kv, data.shape, dt)
        return t, a, s, da, x, v

    def eps_at(x, t):
        return denoiser(x, t, None).eps.astype(dt)

    @jax.jit
    def first(lams, keys):
        def one(args):
            lam, k = args
            t, a, s, da, x, v = point(lam, k)
            _, jv = jax.jvp(lambda y: eps_at(y, t), (x,), (v,))
            return jnp.mean(s * v * jv, axis=0)

        return jax.lax.map(one, (lams, keys))

    @jax.jit
    def second(lams, keys, ls, dls):
        def one(args):
            lam, k, l, dl = args
            t, a, s, da, x, v = point(lam, k)
            eps = eps_at(x, t)
            xdot = (da / a) * x - s * eps  # the ODE in lambda

            def phi(y, lm):
                tt, aa, ss = curves(lm)
                return ss * eps_at(y, tt) / aa

            p, dp = jax.jvp(phi, (x, lam), (xdot, jnp.ones_like(lam)))
            f = p - l * x / a
            df = dp - dl * x / a - l * xdot / a + l * x * da / a**2
            mf, mdf = jnp.mean(f, 0), jnp.mean(df, 0)
            cov = jnp.mean((f - mf) * (df - mdf), 0)
            var = jnp.mean((f - mf) ** 2, 0)
            sl = cov / (var + ridge * jnp.mean(f * f, 0) + jnp.finfo(dt).tiny)
            return sl, mdf - sl * mf

        return jax.lax.map(one, (lams, keys, ls, dls))

    keys = jax.random.split(key, int(num_lambdas))
    ls = first(lams, keys)
    dls = jnp.asarray(np.gradient(np.asarray(ls, np.float64), np.asarray(lams, np.float64), axis=0), dt)
    ss, bs = second(lams, keys, ls, dls)
    return ModelStatistics(np.asarray(lams), np.asarray(ls), np.asarray(ss), np.asarray(bs), process.name, model)
