"""Few-step students: distillation and few-step training methods on :mod:`jdiff.train`'s
seam, each a :class:`Recipe` registered in :data:`METHODS` (``jdiff distill --method``).

- :mod:`~jdiff.distill._teacher`: :class:`Teacher` (a frozen trained network and its
  process) and :func:`load_teacher`; :class:`Setup` and :class:`Recipe`, the seam a
  method plugs into; :class:`DistillError`.
"""

from __future__ import annotations

from jdiff.distill._consistency_recipes import ConsistencyDistillation, ConsistencyTraining, EasyConsistencyTuning
from jdiff.distill._rlcm import RLCM
from jdiff.distill._teacher import DistillError, Recipe, Setup, Teacher, load_teacher

# method name -> Recipe instance (``jdiff distill --method NAME``); each method module
# registers itself below.
METHODS: dict[str, Recipe] = {}
for _r in (ConsistencyDistillation(), ConsistencyTraining(), EasyConsistencyTuning(), RLCM()):
    METHODS[_r.name] = _r

__all__ = ["DistillError", "Recipe", "Setup", "Teacher", "load_teacher", "METHODS"]
