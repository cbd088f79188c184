"""The consistency recipes: ``consistency_distillation`` (CD, with SCott's stochastic
teacher step), ``consistency_training`` (iCT) and ``ect`` on the pieces of
:mod:`jdiff.distill._consistency` (see docs/distill.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff.distill._consistency import (
    cd_loss,
    consistency_function,
    consistency_sample,
    ect_loss,
    ict_loss,
    teacher_solver,
)
from jdiff.distill._teacher import DistillError, Recipe, Setup, Teacher

__all__ = ["ConsistencyDistillation", "ConsistencyTraining", "EasyConsistencyTuning"]


# -------------------------------------------------------------------- recipes


def _options(method: str, given: dict, defaults: dict) -> dict:
    bad = sorted(set(given) - set(defaults))
    if bad:
        raise DistillError(f"{method}: unknown options {bad}; accepted: {sorted(defaults)}")
    return {**defaults, **given}


def _student(teacher: Teacher):
    return consistency_function(teacher.apply, teacher.process, teacher.prediction, teacher.time_input)


class _ConsistencyRecipe(Recipe):
    def sample(self, teacher, params, noise, *, steps, trained_steps, cond=None, key=None, grid=None, **kw):
        if kw:
            raise DistillError(f"{self.name}: unknown sampling options {sorted(kw)}")
        return consistency_sample(
            _student(teacher), params, noise, steps=steps, trained_steps=trained_steps, cond=cond, key=key, grid=grid
        )

    @staticmethod
    def _steps(o):
        s = o["steps"]
        if not isinstance(s, int) or s < 1:
            raise DistillError(f"steps must be a positive int, got {s!r}")
        return s


def _copy(params):
    return jax.tree.map(jnp.array, params)


class ConsistencyDistillation(_ConsistencyRecipe):
    """``consistency_distillation``: CD (Song et al. 2023) with any jdiff solver as the
    teacher's step (``solver``: ``ddim``, ``dpm++``, ``scott`` with ``eta``, or a registry
    name), ``num_scales`` N, the EMA target (``ema``: its decay, for the train step:
    ``notes["ema_decay"]``), ``distance`` ``l2``/``pseudo_huber``, teacher ``guidance``,
    ``steps`` the most sampling steps."""

    name = "consistency_distillation"
    paper = "Song, Dhariwal, Chen & Sutskever, Consistency Models, ICML 2023; SCott (Liu et al. 2024)"
    defaults = dict(solver="ddim", eta=0.3, num_scales=18, ema=0.95, distance="l2", guidance=1.0, steps=4)

    def build(self, teacher: Teacher, **options) -> Setup:
        o = _options(self.name, options, self.defaults)
        solver = teacher_solver(o["solver"], o["eta"])
        if not 0.0 <= o["ema"] < 1.0:
            raise DistillError(f"ema must be a decay in [0, 1), got {o['ema']}")
        g = float(o["guidance"])

        def den(frozen):
            return teacher.denoiser(frozen, guidance=g)

        loss = cd_loss(_student(teacher), den, solver=solver, num_scales=o["num_scales"], distance=o["distance"])
        notes = {**o, "solver": solver.name, "ema_decay": o["ema"], "nfe_teacher_step": solver.nfe(1)}
        return Setup(_copy(teacher.params), teacher.params, loss, None, self._steps(o), notes)


class ConsistencyTraining(_ConsistencyRecipe):
    """``consistency_training``: iCT (Song & Dhariwal 2023) from the teacher's weights
    (``init="teacher"``; the data is the training data, the teacher is never called):
    ``total_steps`` for the curriculum, ``s0``, ``s1``, ``p_mean``, ``p_std``,
    ``distance``, ``steps``."""

    name = "consistency_training"
    paper = "Song & Dhariwal, Improved Techniques for Training Consistency Models, ICLR 2024"
    defaults = dict(total_steps=1000, s0=10, s1=1280, p_mean=-1.1, p_std=2.0, distance="pseudo_huber", steps=4)

    def build(self, teacher: Teacher, **options) -> Setup:
        o = _options(self.name, options, self.defaults)
        loss = ict_loss(
            _student(teacher),
            total_steps=int(o["total_steps"]),
            s0=o["s0"],
            s1=o["s1"],
            p_mean=o["p_mean"],
            p_std=o["p_std"],
            distance=o["distance"],
        )
        return Setup(_copy(teacher.params), None, loss, None, self._steps(o), {**o, "ema_decay": None})


class EasyConsistencyTuning(_ConsistencyRecipe):
    """``ect``: easy consistency tuning (Geng et al. 2024) started from the teacher:
    ``total_steps`` (the ``dt`` curriculum), ``q``, ``stages``, ``p_mean``, ``p_std``,
    ``distance``, ``steps``."""

    name = "ect"
    paper = "Geng, Pokle, Luo, Lin & Kolter, Consistency Models Made Easy, 2024"
    defaults = dict(total_steps=1000, q=2.0, stages=8, p_mean=-1.1, p_std=2.0, distance="pseudo_huber", steps=4)

    def build(self, teacher: Teacher, **options) -> Setup:
        o = _options(self.name, options, self.defaults)
        loss = ect_loss(
            _student(teacher),
            total_steps=int(o["total_steps"]),
            q=o["q"],
            stages=int(o["stages"]),
            p_mean=o["p_mean"],
            p_std=o["p_std"],
            distance=o["distance"],
        )
        return Setup(_copy(teacher.params), None, loss, None, self._steps(o), {**o, "ema_decay": None})
