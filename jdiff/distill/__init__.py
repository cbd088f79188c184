"""Few-step students: distillation and few-step training methods on :mod:`jdiff.train`'s
seam, each a :class:`Recipe` registered in :data:`METHODS` (``jdiff distill --method``).

- :mod:`~jdiff.distill._teacher`: :class:`Teacher` (a frozen trained network and its
  process) and :func:`load_teacher`; :class:`Setup` and :class:`Recipe`, the seam a
  method plugs into; :class:`DistillError`.
- :mod:`~jdiff.distill._run`: training a student in a folder and shipping it
  (:func:`distill_run`, ``jdiff distill``); :mod:`~jdiff.distill._student`: the student
  folder, read back (:func:`load_student`) and drawn from at its step counts
  (:func:`sample_student`, ``jdiff sample --student``).
"""

from __future__ import annotations

from jdiff.distill._run import DistillOutcome, distill_run, parse_options, recipe_options
from jdiff.distill._student import (
    Student,
    export_student,
    load_student,
    sample_student,
    shipped_students,
    student_dir,
)
from jdiff.distill._consistency_recipes import ConsistencyDistillation, ConsistencyTraining, EasyConsistencyTuning
from jdiff.distill._rlcm import RLCM
from jdiff.distill._teacher import DistillError, Recipe, Setup, Teacher, load_teacher

# method name -> Recipe instance (``jdiff distill --method NAME``); each method module
# registers itself below.
METHODS: dict[str, Recipe] = {}
for _r in (ConsistencyDistillation(), ConsistencyTraining(), EasyConsistencyTuning(), RLCM()):
    METHODS[_r.name] = _r

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
]
