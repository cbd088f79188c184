"""Inverse problems: measurement operators and posterior samplers.

A measurement is ``y = A(x0) + sigma_y n`` with ``n ~ N(0, I)``. The operators
(``_operators.py``) are small pytrees (frozen dataclasses whose arrays are leaves and
whose shapes are static) with batched methods on ``(B, *x_shape)`` data:

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

Posterior samplers, each ``f(denoiser, operator, y, sigma_y, key, *, <its settings>,
**sampling)`` returning ``(B, *x_shape)`` restorations (the denoiser carries its
process; ``sampling`` is the shared :class:`Sampling` value's keywords: ``nfe``, ``grid``,
``grid_kind``, ``cond``, ``x_T``, ``return_info``, ``gradient``):

- :func:`dps` (Chung et al., ICLR 2023): 1 call per step, with a VJP through the denoiser;
- :func:`pigdm` (Song et al., ICLR 2023): 1 call per step, with a VJP; needs the SVD;
- :func:`ddrm` (Kawar et al., NeurIPS 2022): 1 call per step, no gradients; needs the SVD;
- :func:`red_diff` (Mardani et al., ICLR 2024): 1 call per step, no denoiser VJP (only
  ``A`` is differentiated);
- :func:`dds` (Chung et al., ICLR 2024): 1 call per step, no gradients; CG on ``A^T A``.

One engine runs them all (``_engine.py``): each sampler is a
:class:`~jdiff.solvers.Solver` (:class:`DPS`, :class:`PiGDM`, :class:`DDS`,
:class:`DDRM`, :class:`REDDiff`) run by :func:`jdiff.sample`'s ``lax.scan``, the
measurement travelling with the denoiser (:func:`measured`). DPS, PiGDM and DDS wrap
another solver's step (DDIM by default, any solver with ``solver=``); DDRM and RED-diff
have their own updates (their docstrings say why). :func:`posterior_sample` runs any of
them: the grid is built from ``nfe`` like :func:`jdiff.sample`'s, ending at the data where
the process reaches it; keys are explicit (sample ``i`` draws its noise from
``fold_in(key, i)``: a sample does not depend on the rest of its batch) and every norm,
inner product and step size is per sample. ``jit``, ``vmap`` and ``grad`` (with the
gradient strategies ``Backprop``, ``Remat``, ``Truncated``) reach them as they reach
:func:`jdiff.sample`.

:func:`mixture_posterior` gives the exact posterior of a
:class:`~jdiff.testbed.GaussianMixture` prior under a linear Gaussian measurement (again
a Gaussian mixture, with full covariances) and :func:`sample_mixture_posterior` samples
it (``_exact.py``).
"""

from jdiff.inverse_problems._ddrm import DDRM, ddrm
from jdiff.inverse_problems._engine import (
    Measured,
    PosteriorSolver,
    Sampling,
    measured,
    measurement_of,
    posterior_sample,
)
from jdiff.inverse_problems._exact import mixture_posterior, sample_mixture_posterior
from jdiff.inverse_problems._guided import DDS, DPS, PiGDM, dds, dps, pigdm
from jdiff.inverse_problems._operators import (
    GaussianBlur,
    Inpainting,
    Nonlinear,
    Operator,
    RandomProjection,
    SuperResolution,
    gaussian_blur,
    inpainting,
    measure,
    nonlinear,
    random_projection,
    super_resolution,
)
from jdiff.inverse_problems._red_diff import REDDiff, red_diff

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
    "DPS",
    "PiGDM",
    "DDRM",
    "REDDiff",
    "DDS",
    "Measured",
    "measured",
    "measurement_of",
    "PosteriorSolver",
    "Sampling",
    "posterior_sample",
    "mixture_posterior",
    "sample_mixture_posterior",
]
