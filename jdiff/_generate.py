"""Sample generation over every device of every host: :func:`generate`, and the
sampling settings as a dataclass, :class:`SamplingConfig`.

:func:`generate` draws ``num`` samples in chunks of ``batch_size``; each chunk is
sharded over the ``data`` axis of a device mesh (default: all devices of all
processes) and the results are gathered to every host in order. Sample ``i`` depends
only on ``(seed, i)`` (its prior noise and its solver noise come from per-sample keys),
not on the batch size, the chunking or the number of devices. The ``jdiff sample``
command and evaluation code (FID) call it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdiff import solvers
from jdiff._checks import reraise_checks
from jdiff._grid import GRID_KINDS
from jdiff._padded import sample_padded
from jdiff._random import per_sample_keys
from jdiff._sample import sample
from jdiff.solvers._registry import FACTORIES

__all__ = ["generate", "SamplingConfig"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample a trained model (the ``sample`` section of a ``jdiff`` run).

    Attributes:
      solver: a name of the solver registry, :func:`jdiff.solvers.names` (e.g.
        ``"dpm++2m"``, ``"unipc3"``), or a factory name (``"dpm_solver_pp"``) whose
        settings come as keywords (``order``).
      order: the solver's order for factory names (0: the solver's default).
      nfe: model evaluations per sample.
      grid: the time grid (default: built from ``nfe`` and ``grid_kind``); ``nfe`` is
        still the solver's budget on it (singlestep solvers choose their orders from it).
      grid_kind: time-grid spacing (:data:`jdiff.GRID_KINDS`).
      num: number of samples.
      guidance: classifier-free guidance scale (1: the conditional model alone).
      ema: sample with the EMA parameters.
      seed: seed of the prior noise and of stochastic solvers.
    """

    solver: str = "ddim"
    order: int = 0
    nfe: int = 20
    grid_kind: str = "default"
    num: int = 64
    guidance: float = 1.0
    ema: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.solver not in FACTORIES:
            try:
                solvers.get(self.solver)
            except (ValueError, TypeError) as e:
                raise ValueError(str(e)) from None
        for name in ("nfe", "num"):
            v = getattr(self, name)
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.order < 0:
            raise ValueError(f"order must be >= 0 (0: the solver's default), got {self.order}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not math.isfinite(self.guidance):
            raise ValueError(f"guidance must be finite, got {self.guidance}")
        if self.grid_kind != "default" and self.grid_kind not in GRID_KINDS:
            raise ValueError(f"unknown grid kind {self.grid_kind!r}; valid kinds: default, {', '.join(GRID_KINDS)}")

    def make_solver(self):
        """The solver, from :func:`jdiff.solvers.get` (``order`` as a keyword when > 0)."""
        try:
            return solvers.get(self.solver, order=self.order) if self.order else solvers.get(self.solver)
        except TypeError as e:
            if "order" in str(e):
                raise ValueError(f"solver {self.solver} has no order option") from None
            raise ValueError(str(e)) from None


def _default_mesh() -> Mesh:
    devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs, dtype=object), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _sample_batch(solver, denoiser, x_T, cond, key_data, grid, nfe, grid_kind):
    keys = jax.random.wrap_key_data(key_data) if solver.stochastic else None
    x, info = sample(solver, denoiser, x_T, grid, cond=cond, key=keys, nfe=nfe, grid_kind=grid_kind, return_info=True)
    return x, info.nfe


_sample_jit = jax.jit(_sample_batch, static_argnames=("solver", "nfe", "grid_kind"))


def _sample_batch_padded(solver, denoiser, x_T, cond, key_data, grid, nfe, grid_kind, max_steps):
    keys = jax.random.wrap_key_data(key_data) if solver.stochastic else None
    return sample_padded(
        solver,
        denoiser,
        x_T,
        grid,
        cond=cond,
        key=keys,
        nfe=nfe,
        grid_kind=grid_kind,
        max_steps=max_steps,
        return_nfe=True,
    )


def _to_global(a, sharding):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def _to_host(x) -> np.ndarray:
    if not x.is_fully_addressable and x.ndim == 0:
        return np.asarray(x.addressable_data(0))
    if not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def generate(
    solver,
    denoiser,
    num: int,
    shape,
    *,
    nfe: int,
    grid=None,
    seed: int = 0,
    key=None,
    cond=None,
    batch_size: int = 0,
    mesh: Mesh | None = None,
    grid_kind: str = "default",
    return_nfe: bool = False,
    max_steps: int | None = None,
):
    """``num`` samples of ``denoiser`` with ``solver``, as a host numpy array of shape
    ``(num, *shape)`` in sample order (on every process).

    Args:
      solver, denoiser: as for :func:`jdiff.sample` (a :class:`jdiff.Denoiser` or a
        wrapper of one, such as :func:`jdiff.wrappers.guidance`).
      num: number of samples; shape: the shape of one sample.
      nfe: model evaluations per sample.
      grid: the time grid (default: built from ``nfe`` and ``grid_kind``); ``nfe`` is
        still the solver's budget on it (singlestep solvers choose their orders from it).
      seed, key: the randomness (``key`` wins when given): sample ``i`` uses the prior
        noise of ``per_sample_keys(fold_in(key, 0), num)[i]`` and the solver noise of
        ``per_sample_keys(fold_in(key, 1), num)[i]``.
      cond: per-sample conditioning (e.g. labels), a pytree of arrays with leading
        axis ``num``, or None.
      batch_size: samples per device program (0: all at once), rounded up to a
        multiple of the mesh size; the last chunk is padded, so one program is compiled.
      mesh: a 1-D device mesh; the batch is split over its axis (default: every device
        of every process).
      grid_kind: the time grid (see :func:`jdiff.time_grid`).
      return_nfe: also return the network calls spent per sample
        (:attr:`jdiff.SampleInfo.nfe`: 2 per evaluation with classifier-free guidance).
      max_steps: sample through :func:`jdiff.sample_padded` with this bound, so that one
        compiled sampling loop serves every ``nfe`` whose grid has at most ``max_steps``
        intervals (for NFE sweeps; not differentiable).
    """
    num = int(num)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0 (0: all at once), got {batch_size}")
    shape = tuple(int(s) for s in shape)
    mesh = _default_mesh() if mesh is None else mesh
    if len(mesh.axis_names) != 1:
        raise ValueError(f"generate needs a 1-D data mesh, got axes {mesh.axis_names}")
    n_dev = mesh.devices.size
    batch = P(mesh.axis_names[0])
    data_sh, rep_sh = NamedSharding(mesh, batch), NamedSharding(mesh, P())

    key = jax.random.key(seed) if key is None else key
    noise_keys = per_sample_keys(jax.random.fold_in(key, 0), num)
    solver_keys = np.asarray(jax.random.key_data(per_sample_keys(jax.random.fold_in(key, 1), num)))
    if cond is not None:
        cond = jax.tree.map(np.asarray, cond)
        bad = [c.shape for c in jax.tree.leaves(cond) if c.shape[:1] != (num,)]
        if bad:
            raise ValueError(f"cond must have leading axis num={num}, got shapes {bad}")

    bs = num if batch_size == 0 else min(batch_size, num)
    bs = -(-bs // n_dev) * n_dev
    den = jax.tree.map(lambda a: _to_global(a, rep_sh), denoiser)
    if grid is not None:
        grid = _to_global(np.asarray(grid, np.float32), rep_sh)
    out, spent = [], 0
    for start in range(0, num, bs):
        idx = np.arange(start, start + bs) % num  # the last chunk is padded: one compiled program
        x_T = np.asarray(denoiser.process.prior_sample(noise_keys[idx], (bs, *shape), jnp.float32))
        c = None if cond is None else jax.tree.map(lambda a: _to_global(a[idx], data_sh), cond)
        keys = _to_global(solver_keys[idx], data_sh)
        args = (solver, den, _to_global(x_T, data_sh), c, keys, grid, nfe, grid_kind)
        with reraise_checks():  # inputs are concrete here: a failed check is a ValueError
            if max_steps is None:
                x, n = _sample_jit(*args)
            else:
                x, n = _sample_batch_padded(*args, max_steps)
            out.append(_to_host(x)[: min(bs, num - start)])
            spent = int(_to_host(n))
    x = np.concatenate(out, axis=0)
    return (x, spent) if return_nfe else x
