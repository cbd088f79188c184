r"""Inversion: from data back to the noise that regenerates it, for editing.

Every method here maps data ``x0`` (identified with the state at the last grid time,
``t_min``) to what a sampler needs to regenerate it, and :func:`regenerate` runs that
sampler, possibly with another denoiser, conditioning or guidance scale (editing).
The grid is the sampling grid, decreasing from noise to data, as for :func:`jdiff.sample`;
both of its ends must have finite log-SNR.

- :func:`invert` (and :func:`ddim_invert`): the deterministic solvers run forward in
  log-SNR. An exponential-integrator step approximates the same integral whichever way
  it goes, so DDIM, DPM-Solver(++) multistep, UniPC/UniP, DEIS and iPNDM run
  unchanged on the reversed grid, data to noise (the naive DDIM inversion of Song et
  al. 2021, Dhariwal & Nichol 2021, and its multistep generalization). The round trip
  is not exact: it errs at the solver's order. ``refine=k`` makes each step implicit
  and solves it with ``k`` fixed-point iterations (Pan et al., "Effective Real Image
  Editing with Accelerated Iterative Diffusion Inversion", ICCV 2023; Garibi et al.,
  "ReNoise", ECCV 2024): the unknown noisier state ``x_t`` must satisfy

      x_s = c_x x_t + c_0 m(x_t, t) + sum_j c_j m_j,

  the exponential-integrator step ``t -> s`` (toward the data) whose polynomial goes
  through the model output at its own start ``(x_t, t)`` and the ``order - 1`` known
  outputs at ``s`` and before, so
  ``x_t <- (x_s - c_0 m(x_t, t) - sum_j c_j m_j) / c_x``. For DDIM (order 1) that
  equation is exactly the forward DDIM step, so the refined inversion converges to an
  exact inverse of DDIM sampling as ``k`` grows. A multistep solver's forward step also
  uses outputs at noisier states that the inversion has not reached, so for it the
  refined step is an implicit (Adams-Moulton-type) step of the same order, not the
  sampler's inverse: it converges, but need not shrink the round trip.
- :func:`edict_invert`: EDICT (Wallace, Gokul & Naik, "EDICT: Exact Diffusion Inversion
  via Coupled Transformations", CVPR 2023): two coupled DDIM sequences mixed with
  weight ``p``; every step is an affine coupling layer, inverted in closed form. Two
  model calls per step; exact by construction.
- :func:`bdia_invert`: BDIA-DDIM (Zhang, Lewis & Kleijn, "Exact Diffusion Inversion via
  Bi-directional Integration Approximation", ECCV 2024): ``x_{i+1}`` from the last two
  states, ``x_{i+1} = gamma (x_{i-1} - D(x_i; t_i -> t_{i-1})) + D(x_i; t_i -> t_{i+1})``
  with ``D`` the DDIM step, solvable for ``x_{i-1}``. One model call per step; exact by
  construction given the first two states.
- :func:`ddpm_invert`: edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov &
  Michaeli, "An Edit Friendly DDPM Noise Space", CVPR 2024): independently noised
  ``x_t`` at every grid time and the per-step noises ``z_t`` that make DDPM sampling pass
  through them. One model call per step; exact by construction.

Model calls (NFE) of an inversion over ``N`` grid intervals: ``N (1 + refine)`` for
:func:`invert`, ``2 N`` for EDICT, ``N`` for BDIA and edit-friendly DDPM. Regeneration
costs ``N`` (ODE solvers, DDPM), ``2 N`` (EDICT) and ``N - 1`` (BDIA, which starts from
two stored states).

Layout: ``_records.py`` (the records and the input checks every inversion shares),
``_ode.py`` (:func:`invert`), ``_exact.py`` (EDICT, BDIA, edit-friendly DDPM; their DDIM
coefficients come from :mod:`jdiff.solvers.ddim`, the one place they are computed) and
``_regenerate.py``.

Every inversion and every regeneration is one :func:`jdiff.sample` call: each method is a
solver of the protocol (``ODEInverse`` around the inverted solver; ``EDICT``, ``BDIA``
and ``EditFriendlyDDPM`` with ``inverse=True`` or False). An inverting solver declares
``direction = "to_noise"``, so ``sample`` runs it on the reversed, increasing grid, data
to noise, and its ``finish`` returns what regeneration needs (EDICT's pair, BDIA's
``x_0`` and ``x_1``, DDPM's ``x_T`` and noises). A regenerating solver carries what its
start holds beyond ``x_T`` as array fields (EDICT's ``y_T``, BDIA's ``x_0`` and its
time, DDPM's noises ``zs``), as it carries the traced settings ``p``, ``gamma``,
``eta`` and the refinement count: ``sample`` passes a solver's array fields to its
compiled program as arguments. BDIA's regeneration is ``sample`` from ``x_1`` over
``grid[1:]`` (its first state is given, not computed): ``N - 1`` steps.

Everything runs under ``jit`` (``sample``'s compiled programs, cached per settings;
``p``, ``gamma``, ``eta`` and the number of refinement iterations are traced, so
changing them does not recompile); input checks raise ``ValueError`` before anything
runs.
"""

from jdiff.inversion._exact import bdia_invert, ddpm_invert, edict_invert
from jdiff.inversion._ode import ddim_invert, invert, invertible
from jdiff.inversion._records import BDIAInversion, DDPMInversion, EDICTInversion, ODEInversion
from jdiff.inversion._regenerate import regenerate

__all__ = [
    "ODEInversion",
    "EDICTInversion",
    "BDIAInversion",
    "DDPMInversion",
    "invert",
    "ddim_invert",
    "edict_invert",
    "bdia_invert",
    "ddpm_invert",
    "regenerate",
    "invertible",
]
