"""Few-step students: distillation and few-step training methods on :mod:`jdiff.train`'s
seam, each a :class:`Recipe` registered in :data:`METHODS` (``jdiff distill --method``).

- :mod:`~jdiff.distill._teacher`: :class:`Teacher` (a frozen trained network and its
  process) and :func:`load_teacher`; :class:`Setup` and :class:`Recipe`, the seam a
  method plugs into; :class:`DistillError`.
"""

from __future__ import annotations

from jdiff.distill._teacher import DistillError, Recipe, Setup, Teacher, load_teacher

# method name -> Recipe instance (``jdiff distill --method NAME``); each method module
# registers itself below.
METHODS: dict[str, Recipe] = {}

from jdiff.distill._reflow import Reflow, SlimFlow  # noqa: E402  (registered below)
from jdiff.distill._score import ScoreDistillation  # noqa: E402

METHODS["reflow"] = Reflow()
METHODS["slimflow"] = SlimFlow()
METHODS["score_distillation"] = ScoreDistillation()

__all__ = ["DistillError", "Recipe", "Setup", "Teacher", "load_teacher", "METHODS"]
