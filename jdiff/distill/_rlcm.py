"""RLCM: reward fine-tuning of a consistency student (Oertell, Chang, Zhang, Brantley &
Sun, "RL for Consistency Models: Faster Reward Guided Text-to-Image Generation", 2024).

The multistep consistency sampler is a Markov decision process: the state is ``(x_t,
t, cond)``, the action the next point ``x_{t'}`` drawn by the re-noising step
``N((alpha_{t'} / alpha_end) f_theta(x_t, t), c_{t'}^2 I)`` (:class:`ConsistencySampler`'s
Gaussian transition, the stochastic policy), and the reward is given at the end, on the
last ``f_theta``. The policy gradient is DDPO's on-policy surrogate (Black et al., ICLR
2024) over those transitions (:func:`jdiff.preference.ddpo_loss` with every ratio 1:
``-mean(A grad log pi)``) with per-class normalized advantages
(:func:`jdiff.preference.normalize_advantages`); the log-probabilities are
:func:`jdiff.preference.trajectory_log_probs` of the very sampler that drew the
trajectories.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._sample import sample
from jdiff.distill._consistency import consistency_sampler, consistency_times, student_denoiser
from jdiff.distill._consistency_recipes import _ConsistencyRecipe, _options, _student
from jdiff.distill._teacher import DistillError, Setup, Teacher
from jdiff.features.digits import digits_classifier
from jdiff.preference import ddpo_loss, normalize_advantages, trajectory_log_probs
from jdiff.runs._pretrained import unflatten_params

__all__ = ["rlcm_loss", "classifier_reward", "load_student", "RLCM"]

_C_START = 0x524C  # fold_in constant of a sample's starting noise


def classifier_reward(classifier=None) -> Callable:
    """``reward(x0, labels) -> (B,)``: the digits classifier's log-probability of each
    sample's label (:func:`jdiff.features.digits.digits_classifier`)."""
    clf = digits_classifier() if classifier is None else classifier

    def reward(x0, labels):
        logp = jax.nn.log_softmax(clf.apply(x0)[1], axis=-1)
        return jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1)[:, 0]

    return reward


def rlcm_loss(f, reward_fn: Callable, *, steps: int = 4, grid=None, clip: float = 1e-4):
    """RLCM's policy-gradient loss on the train seam (module docstring).

    Each sample of the batch starts its own trajectory (its key gives the starting
    noise and the re-noising); the batch's ``"x"`` gives only the shape and ``"label"``
    the condition and the advantage group (a class with a single sample in the batch
    has advantage 0: batches of a few samples per class are needed).

    Args:
      f: the consistency student (:func:`jdiff.distill._consistency.consistency_function`).
      reward_fn: ``reward_fn(x0, cond) -> (B,)`` (no gradient is taken through it).
      steps: sampling steps of the policy (at least 2: a one-step sampler has no
        stochastic transition); grid: its ``(steps + 1,)`` grid (default
        :func:`consistency_times`); clip: DDPO's ratio clip.

    Returns:
      ``loss_fn(params, batch, keys, *, frozen=None) -> (loss, metrics)``; metrics hold
      ``reward`` (the mean reward of the batch's samples) and DDPO's.
    """
    if not isinstance(steps, int) or steps < 2:
        raise DistillError(
            f"rlcm needs a policy of 2 or more steps (a 1-step sampler has no stochastic step), got {steps!r}"
        )
    process = f.process
    grid = consistency_times(process, steps, t_min=f.t_min) if grid is None else jnp.asarray(grid)
    solver = consistency_sampler()

    def loss_fn(params, batch, keys, *, frozen=None):
        del frozen
        shape = jnp.shape(batch["x"])
        cond = batch.get("label")
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _C_START), tuple(shape[1:])))(keys)
        x_T = noise * process.prior_std()
        fixed = jax.lax.stop_gradient(params)
        x0, info = sample(
            solver, student_denoiser(f, fixed), x_T, grid, cond=cond, key=keys, return_info=True, trajectory=True
        )
        xs = jax.lax.stop_gradient(info.xs)
        r = jax.lax.stop_gradient(reward_fn(x0, cond))
        groups = jnp.zeros(r.shape, jnp.int32) if cond is None else cond
        adv = normalize_advantages(r, groups)
        lp = trajectory_log_probs(solver, student_denoiser(f, params), xs, grid, cond=cond)[:-1]
        loss, m = ddpo_loss(lp, None, adv, clip=clip)
        return loss, {**m, "reward": jnp.mean(r)}

    return loss_fn


def load_student(path, like):
    """Parameters of ``like``'s structure from an ``.npz`` of
    :func:`jdiff.runs.flatten_params` keys (a saved student).

    Raises:
      DistillError: no such file, or keys/shapes that do not match."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DistillError(f"student {path!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return jax.tree.map(jnp.asarray, unflatten_params(arrays, like, where=f"student {path!r}"))
    except (ValueError, KeyError, OSError) as e:
        raise DistillError(f"student {path!r}: {e}") from e


class RLCM(_ConsistencyRecipe):
    """``rlcm``: reward fine-tuning of a consistency student (``student``: its ``.npz``;
    default the teacher's weights as an untrained consistency function) with the digits
    classifier's log-probability of the label as the reward; ``steps`` (>= 2) of the
    policy's sampler, ``clip``."""

    name = "rlcm"
    paper = "Oertell, Chang, Zhang, Brantley & Sun, RL for Consistency Models, 2024"
    defaults = dict(student=None, steps=4, clip=1e-4)

    def build(self, teacher: Teacher, **options) -> Setup:
        o = _options(self.name, options, self.defaults)
        if not teacher.num_classes:
            raise DistillError(
                "rlcm: the reward is the log-probability of the label: it needs a class-conditional teacher"
            )
        params = teacher.params if o["student"] is None else load_student(o["student"], teacher.params)
        loss = rlcm_loss(_student(teacher), classifier_reward(), steps=self._steps(o), clip=o["clip"])
        return Setup(jax.tree.map(jnp.array, params), None, loss, None, self._steps(o), {**o, "ema_decay": None})
