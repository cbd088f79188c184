"""Few-step students: distillation and few-step training methods on :mod:`jdiff.train`'s
seam, each a :class:`Recipe` registered in :data:`METHODS` (``jdiff distill --method``).

- :mod:`~jdiff.distill._teacher`: :class:`Teacher` (a frozen trained network and its
  process) and :func:`load_teacher`; :class:`Setup` and :class:`Recipe`, the seam a
  method plugs into; :class:`DistillError`.
- :mod:`~jdiff.distill._run`: training a student in a folder and shipping it
  (:func:`distill_run`, ``jdiff distill``); :mod:`~jdiff.distill._student`: the student
  folder, read back (:func:`load_student`) and drawn from at its step counts
  (:func:`sample_student`, ``jdiff sample --student``).
- :mod:`~jdiff.distill._progressive`: progressive distillation (Salimans & Ho 2022),
  rounds that halve the DDIM steps (:func:`progressive_rounds`).
- :mod:`~jdiff.distill._guided`: guided distillation (Meng et al. 2023): a
  guidance-scale-conditioned student, then progressive rounds (:func:`guided_distill`).
- :mod:`~jdiff.distill._mmd`: MMD-DDM (Aiello et al. 2023), MMD fine-tuning of a few-step
  DDIM sampler in the digits classifier's feature space.
"""

from __future__ import annotations

from jdiff.distill._consistency_recipes import ConsistencyDistillation, ConsistencyTraining, EasyConsistencyTuning
from jdiff.distill._guided import GUIDED, GuidedRecipe, guided_distill
from jdiff.distill._mmd import MMD, MMDRecipe, mmd2_unbiased
from jdiff.distill._progressive import PROGRESSIVE, ProgressiveRecipe, progressive_rounds
from jdiff.distill._rlcm import RLCM
from jdiff.distill._run import DistillOutcome, distill_run, parse_options, recipe_options
from jdiff.distill._student import (
    Student,
    export_student,
    load_student,
    sample_student,
    shipped_students,
    student_dir,
)
from jdiff.distill._teacher import DistillError, Recipe, Setup, Teacher, load_teacher

# method name -> Recipe instance (``jdiff distill --method NAME``); each method module
# registers itself below.
METHODS: dict[str, Recipe] = {}
for _r in (ConsistencyDistillation(), ConsistencyTraining(), EasyConsistencyTuning(), RLCM()):
    METHODS[_r.name] = _r
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
    "DistillOutcome",
    "Student",
    "distill_run",
    "load_student",
    "sample_student",
    "export_student",
    "shipped_students",
    "student_dir",
    "parse_options",
    "recipe_options",
    "ProgressiveRecipe",
    "progressive_rounds",
    "GuidedRecipe",
    "guided_distill",
    "MMDRecipe",
    "mmd2_unbiased",
]
from jdiff.distill._reflow import Reflow, SlimFlow  # noqa: E402  (registered below)
from jdiff.distill._score import ScoreDistillation  # noqa: E402

METHODS["reflow"] = Reflow()
METHODS["slimflow"] = SlimFlow()
METHODS["score_distillation"] = ScoreDistillation()

__all__ = ["DistillError", "Recipe", "Setup", "Teacher", "load_teacher", "METHODS"]
