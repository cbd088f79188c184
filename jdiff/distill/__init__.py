"""Few-step students: distillation and few-step training methods on :mod:`jdiff.train`'s
seam, each a :class:`Recipe` registered in :data:`METHODS` (``jdiff distill --method``).

- :mod:`~jdiff.distill._teacher`: :class:`Teacher` (a frozen trained network and its
  process) and :func:`load_teacher`; :class:`Setup` and :class:`Recipe`, the seam a
  method plugs into; :class:`DistillError`.
- :mod:`~jdiff.distill._progressive`: progressive distillation (Salimans & Ho 2022),
  rounds that halve the DDIM steps (:func:`progressive_rounds`).
- :mod:`~jdiff.distill._guided`: guided distillation (Meng et al. 2023): a
  guidance-scale-conditioned student, then progressive rounds (:func:`guided_distill`).
- :mod:`~jdiff.distill._mmd`: MMD-DDM (Aiello et al. 2023), MMD fine-tuning of a few-step
  DDIM sampler in the digits classifier's feature space.
"""

from __future__ import annotations

from jdiff.distill._guided import GUIDED, GuidedRecipe, guided_distill
from jdiff.distill._mmd import MMD, MMDRecipe, mmd2_unbiased
from jdiff.distill._progressive import PROGRESSIVE, ProgressiveRecipe, progressive_rounds
from jdiff.distill._teacher import DistillError, Recipe, Setup, Teacher, load_teacher

# method name -> Recipe instance (``jdiff distill --method NAME``); each method module
# registers itself below.
METHODS: dict[str, Recipe] = {}
METHODS[PROGRESSIVE.name] = PROGRESSIVE
METHODS[GUIDED.name] = GUIDED
METHODS[MMD.name] = MMD

__all__ = [
    "DistillError",
    "Recipe",
    "Setup",
    "Teacher",
    "load_teacher",
    "METHODS",
    "ProgressiveRecipe",
    "progressive_rounds",
    "GuidedRecipe",
    "guided_distill",
    "MMDRecipe",
    "mmd2_unbiased",
]
