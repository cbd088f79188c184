"""Optimized and learned time grids for few-step sampling.

Three ways to place the ``N + 1`` points of a time grid for a given denoiser, process
and solver, each returning an ordinary grid (a decreasing array) that
:func:`jdiff.sample` takes like any other:

- :func:`ld3` -- learned by gradient descent through the sampler (LD3: Tong et al.,
  "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025). The grid is a
  cumulative softmax of ``N`` free logits mapped between the two end points (in
  log-SNR, or in t where the log-SNR is infinite), so it is strictly decreasing and
  starts and ends where asked for any logits. Adam (optax) fits the logits so that the
  student solver at N steps lands where a teacher (a high-NFE or exact solve from the
  same noise) lands, on about 100 training noises; optionally the student may start
  anywhere in a small ball around each noise (LD3's slack, "soft teacher forcing"),
  and the network may be fed its own times near the grid's (``decouple``: LD3's second
  set of learned times; :func:`jdiff.wrappers.network_time`).
- :func:`gits` -- dynamic programming over the time points of a fine teacher
  trajectory (GITS: Chen et al., "On the Trajectory Regularity of ODE-based Diffusion
  Sampling", ICML 2024): the cost of a coarse step between two fine points is the error
  of one student step started on the teacher's state, and the DP picks the N steps of
  least total cost. No gradients.
- :func:`dmn` -- no model calls at all (Xue et al., "Accelerating Diffusion Sampling
  with Optimized Time Steps", CVPR 2024): the interior log-SNR points minimize the
  paper's bound on the discretization error of a multistep data-prediction solver
  (:func:`dmn_objective`).

:func:`save_grids` / :func:`load_grid` keep grids in a small JSON file tied to the
model (a fingerprint of its parameters), the process, the solver and the NFE; a file
made for another model, process, solver or NFE is refused. :func:`tune` fits, validates
and saves grids for a list of NFEs with a progress bar (the ``jdiff tune`` command):
every fit is scored on held-out noises against the best fixed grid of the same solver
and NFE, which is kept instead when the fit does not beat it.

Every tuner can end at the data (``t_end`` the process's ``t_data``, e.g. ``0.0``); the
interior points then stay in ``[t_min, t_max]``, and no fit leaves the process's valid
time range. Fits that share the solver, the NFE, the settings and the shapes share one
compiled program; each fit function keeps a bounded number of them (``_programs``).

Modules: ``_grids`` (the parameterization, the shared checks, :class:`GridFit`,
:func:`teacher_solve`), ``_ld3``, ``_gits``, ``_dmn`` (the tuners), ``_files`` (grid
files), ``_validate`` (the held-out comparison), ``_tune`` (:func:`tune`), ``_programs``
(bounded program caches).
"""

from jdiff.tune._dmn import _step_weights as _step_weights  # noqa: F401  (tests)
from jdiff.tune._dmn import dmn, dmn_objective
from jdiff.tune._files import FORMAT as FORMAT  # noqa: F401
from jdiff.tune._files import check_grid_file, load_grid, model_fingerprint, read_grids, save_grids
from jdiff.tune._gits import _brute_force_path as _brute_force_path  # noqa: F401  (tests)
from jdiff.tune._gits import gits, gits_costs, gits_path
from jdiff.tune._grids import (
    GridFit,
    default_keep,
    grid_error,
    grid_from_logits,
    grid_space,
    logits_from_grid,
    net_grid_from,
    teacher_solve,
)
from jdiff.tune._grids import _nfe_arg as _nfe_arg  # noqa: F401  (experiments)
from jdiff.tune._ld3 import ld3
from jdiff.tune._tune import METHODS, tune

__all__ = [
    "grid_from_logits",
    "logits_from_grid",
    "grid_space",
    "net_grid_from",
    "ld3",
    "gits",
    "gits_path",
    "gits_costs",
    "dmn",
    "dmn_objective",
    "GridFit",
    "teacher_solve",
    "grid_error",
    "model_fingerprint",
    "save_grids",
    "load_grid",
    "read_grids",
    "check_grid_file",
    "default_keep",
    "tune",
    "METHODS",
]
