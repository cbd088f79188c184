"""Regeneration: sample from an inversion, with the inverting denoiser or another (editing)."""

from __future__ import annotations

from jdiff._param import check_cond_batch
from jdiff._process import same_process
from jdiff._sample import sample
from jdiff.inversion._exact import _bdia, _bdia_impl, _ddpm_regen, _ddpm_regen_impl, _edict, _edict_impl
from jdiff.inversion._records import (
    BDIAInversion,
    DDPMInversion,
    EDICTInversion,
    ODEInversion,
    _check_denoiser,
    _maybe_jit,
    _num,
)

__all__ = ["regenerate"]


def regenerate(denoiser, inversion, *, cond=None):
    """Sample from an inversion: the data again with the inversion's denoiser and
    conditioning, an edit of it with others.

    Args:
      denoiser: a :class:`~jdiff.Denoiser` or wrapper; it may differ from the one used
        to invert (another conditioning model, another guidance scale) but must use the
        same process.
      inversion: what an ``*_invert`` function returned.
      cond: the conditioning of the regeneration (per-sample leaves batched).

    Returns:
      ``(B, ...)`` samples in the dtype of the inversion's ``x_T``.

    Raises:
      TypeError: ``inversion`` is not an inversion record, or ``denoiser`` not a denoiser.
      ValueError: a ``cond`` whose batch is not the inversion's, or a denoiser of another
        process than the inverting one.
    """
    _check_denoiser(denoiser)
    if not isinstance(inversion, (ODEInversion, EDICTInversion, BDIAInversion, DDPMInversion)):
        raise TypeError(f"inversion must be what an *_invert function returned, got {type(inversion).__name__}")
    if inversion.process is not None and not same_process(denoiser.process, inversion.process):
        raise ValueError(
            f"regenerate: the denoiser's process {denoiser.process!r} is not the one the inversion was made "
            f"with ({inversion.process!r}); its x_T and grid only mean something under that process"
        )
    x_T = inversion.x_T
    check_cond_batch(cond, x_T.shape[0], "the inversion's x_T", x_T.shape)
    if isinstance(inversion, ODEInversion):
        return sample(inversion.solver, denoiser, x_T, inversion.grid, cond=cond)
    tree = (denoiser, cond)
    if isinstance(inversion, EDICTInversion):
        run = _maybe_jit(_edict_impl, _edict, tree)
        x, _ = run(
            denoiser,
            x_T,
            inversion.y_T,
            inversion.grid,
            cond,
            _num(inversion.p, x_T),
            leapfrog=inversion.leapfrog,
            inverse=False,
        )
    elif isinstance(inversion, BDIAInversion):
        run = _maybe_jit(_bdia_impl, _bdia, tree)
        x, _ = run(denoiser, x_T, inversion.x_1, inversion.grid, cond, _num(inversion.gamma, x_T), inverse=False)
    else:
        run = _maybe_jit(_ddpm_regen_impl, _ddpm_regen, tree)
        x = run(denoiser, x_T, inversion.zs, inversion.grid, cond, _num(inversion.eta, x_T))
    return x.astype(x_T.dtype)
