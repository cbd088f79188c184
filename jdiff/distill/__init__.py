"""Few-step students: distillation and few-step training methods on :mod:`jdiff.train`'s
seam, each a :class:`Recipe` registered in :data:`METHODS` (``jdiff distill --method``).

- :mod:`~jdiff.distill._teacher`: :class:`Teacher` (a frozen trained network and its
  process) and :func:`load_teacher`; :class:`Setup` and :class:`Recipe`, the seam a
  method plugs into; :class:`DistillError`.
- :mod:`~jdiff.distill._run`: training a student in a folder and shipping it
  (:func:`distill_run`, ``jdiff distill``); :mod:`~jdiff.distill._student`: the student
  folder, read back (:func:`load_student`) and drawn from at its step counts
  (:func:`sample_student`, ``jdiff sample --student``).
- :mod:`~jdiff.distill._consistency` (recipes in ``_consistency_recipes``): consistency
  models (Song et al. 2023; Song & Dhariwal 2024; Geng et al. 2024): the boundary
  parameterization, consistency distillation with any jdiff solver as the teacher's step,
  consistency training (iCT), easy consistency tuning (ECT), the multistep consistency
  sampler; :mod:`~jdiff.distill._rlcm`: RLCM (Oertell et al. 2024), reward fine-tuning of
  a consistency student.
- :mod:`~jdiff.distill._progressive`: progressive distillation (Salimans & Ho 2022),
  rounds that halve the DDIM steps (:func:`progressive_rounds`).
- :mod:`~jdiff.distill._guided`: guided distillation (Meng et al. 2023): a
  guidance-scale-conditioned student, then progressive rounds (:func:`guided_distill`).
- :mod:`~jdiff.distill._mmd`: MMD-DDM (Aiello et al. 2023), MMD fine-tuning of a few-step
  DDIM sampler in the digits classifier's feature space.
- :mod:`~jdiff.distill._rectify` and :mod:`~jdiff.distill._reflow`: any teacher read as
  a rectified flow, reflow and its one-step distillation (Liu et al. 2023), SlimFlow
  (Zhu et al. 2024); :mod:`~jdiff.distill._score`: score distillation into a one-step
  generator (SwiftBrush, Nguyen & Tran 2024; variational score distillation).
"""

from __future__ import annotations

from jdiff.distill._consistency_recipes import ConsistencyDistillation, ConsistencyTraining, EasyConsistencyTuning
from jdiff.distill._guided import GUIDED, GuidedRecipe, guided_distill
from jdiff.distill._mmd import MMD, MMDRecipe, mmd2_unbiased
from jdiff.distill._progressive import PROGRESSIVE, ProgressiveRecipe, progressive_rounds
from jdiff.distill._reflow import Reflow, SlimFlow
from jdiff.distill._rlcm import RLCM
from jdiff.distill._run import DistillOutcome, distill_run, parse_options, recipe_options
from jdiff.distill._score import ScoreDistillation
from jdiff.distill._student import (
    Student,
    export_student,
    load_student,
    sample_student,
    shipped_students,
    student_dir,
)
from jdiff.distill._teacher import DistillError, Recipe, Setup, Teacher, load_teacher

# method name -> Recipe instance (``jdiff distill --method NAME``)
METHODS: dict[str, Recipe] = {
    r.name: r
    for r in (
        ConsistencyDistillation(),
        ConsistencyTraining(),
        EasyConsistencyTuning(),
        RLCM(),
        PROGRESSIVE,
        GUIDED,
        MMD,
        Reflow(),
        SlimFlow(),
        ScoreDistillation(),
    )
}

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
    "ConsistencyDistillation",
    "ConsistencyTraining",
    "EasyConsistencyTuning",
    "RLCM",
    "ProgressiveRecipe",
    "progressive_rounds",
    "GuidedRecipe",
    "guided_distill",
    "MMDRecipe",
    "mmd2_unbiased",
    "Reflow",
    "SlimFlow",
    "ScoreDistillation",
]
