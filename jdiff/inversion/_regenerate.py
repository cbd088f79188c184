"""Regeneration: sample from an inversion, with the inverting denoiser or another (editing).

Every regeneration is :func:`jdiff.sample` with the solver the inversion implies.
"""

from __future__ import annotations

from jdiff._param import check_cond_batch
from jdiff._process import same_process
from jdiff._sample import sample
from jdiff.inversion._exact import BDIA, EDICT, EditFriendlyDDPM
from jdiff.inversion._records import BDIAInversion, DDPMInversion, EDICTInversion, ODEInversion, _check_denoiser, _num

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
    solver, start, grid = _sampler(inversion)
    return sample(solver, denoiser, start, grid, cond=cond)


def _sampler(inversion):
    """``(solver, start, grid)`` of the :func:`jdiff.sample` call that samples from
    ``inversion``: the solver's settings traced (arrays of the compute dtype of
    ``x_T``) and its starting data beyond the start as fields; BDIA starts from its
    second state on ``grid[1:]``."""
    x_T, grid = inversion.x_T, inversion.grid
    if isinstance(inversion, ODEInversion):
        return inversion.solver, x_T, grid
    if isinstance(inversion, EDICTInversion):
        return EDICT(_num(inversion.p, x_T), inversion.y_T, inversion.leapfrog), x_T, grid
    if isinstance(inversion, BDIAInversion):
        return BDIA(_num(inversion.gamma, x_T), x_0=x_T, t_0=grid[0]), inversion.x_1, grid[1:]
    return EditFriendlyDDPM(_num(inversion.eta, x_T), inversion.zs), x_T, grid
