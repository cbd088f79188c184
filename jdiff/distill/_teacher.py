"""The teacher of a distillation and the seam every method plugs into.

A :class:`Teacher` is a trained network with everything a distillation needs to know
about it: the pure ``apply``, its (frozen) parameters, its process, what it predicts and
what time it takes, the data shape and the classes, and the run it came from (so that a
student of the same architecture can be built and initialized from the teacher).
:func:`load_teacher` reads one from a shipped model name, a shipped-model folder or a
``jdiff train`` run directory.

A method is a :class:`Recipe`: from a teacher and its options it builds a
:class:`Setup` (the student network and its initial parameters, the frozen parameters,
and the loss on :mod:`jdiff.train`'s seam ``loss_fn(params, batch, keys, *, frozen)``),
and it samples the trained student at its own step counts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff.runs import _dir as R
from jdiff.runs._build import Run, denoiser_apply, run_denoiser, to_host
from jdiff.runs._config import config_from_dict, config_to_dict
from jdiff.runs._pretrained import PRETRAINED, _abstract_run, _read_json, pretrained_dir, unflatten_params

__all__ = ["Teacher", "Setup", "Recipe", "load_teacher", "DistillError"]


class DistillError(ValueError):
    """A distillation that cannot be done as asked (a teacher of the wrong process, a
    student asked for more steps than it was trained for, bad options); the message says
    what was found and what is accepted."""


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A trained denoiser network, frozen.

    Attributes:
      apply: ``apply(params, x, t_in, cond, key=None) -> out`` (``out`` in the
        ``prediction`` parameterization, ``t_in`` the ``time_input`` of the process time).
      params: the teacher's parameters (EMA ones for a run).
      process: its :class:`jdiff.Process`; prediction, time_input: as in
        :class:`jdiff.Denoiser`.
      shape: one example's shape; num_classes: 0 if unconditional (the null class used by
        classifier-free guidance is ``num_classes``).
      run: the :class:`jdiff.runs.Run` it was built from (configuration, NNX model,
        abstract parameters): a student of the same architecture is ``run.apply`` with
        parameters of ``run.params``'s structure.
      source: where it was read from (for records and messages).
    """

    apply: Callable
    params: Any
    process: Any
    prediction: str
    time_input: str
    shape: tuple
    num_classes: int
    run: Run | None = None
    source: str = ""

    def denoiser(self, params=None, guidance: float = 1.0) -> jdiff.Denoiser:
        """The network with ``params`` (default: the teacher's) as a :class:`jdiff.Denoiser`,
        wrapped in classifier-free guidance when ``guidance != 1`` and the model is
        class-conditional."""
        den = jdiff.Denoiser(
            apply_fn=self.apply,
            params=self.params if params is None else params,
            process=self.process,
            prediction=self.prediction,
            time_input=self.time_input,
        )
        if self.num_classes and guidance != 1.0:
            den = jdiff.wrappers.guidance(den, guidance, self.num_classes)
        return den


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a method trains (built by :meth:`Recipe.build`).

    Attributes:
      params: the student's initial trainable parameters (a pytree; e.g. a copy of the
        teacher's, or ``{"generator": ..., "aux": ...}`` for methods with two networks).
      frozen: the parameters the loss reads and never trains (the teacher's, ...), passed
        as ``loss_fn(..., frozen=frozen)``; ``None`` for none.
      loss_fn: ``loss_fn(params, batch, keys, *, frozen=None) -> (loss, metrics)`` for
        :func:`jdiff.train.train` (``keys``: one key per sample of the batch).
      batch_fn: ``batch_fn(x, labels) -> batch`` turning a batch of training data into
        the loss's batch (``None``: ``{"x": x, "label": labels}``).
      steps: the student's sampling steps (its NFE).
      notes: facts worth recording with the student (options resolved, ...).
    """

    params: Any
    frozen: Any
    loss_fn: Callable
    batch_fn: Callable | None = None
    steps: int = 1
    notes: dict = dataclasses.field(default_factory=dict)


class Recipe:
    """A distillation method: subclass it and register an instance in
    :data:`jdiff.distill.METHODS`.

    ``name`` is the ``--method`` of ``jdiff distill``; ``paper`` the citation. ``build``
    makes the :class:`Setup` from a teacher and options (raise :class:`DistillError` for a
    teacher of another process, unknown or bad options). ``sample`` draws from the trained
    student with ``steps`` network calls (raise :class:`DistillError` when ``steps`` is
    more than ``trained_steps`` allows); ``noise`` is the standard-normal starting draw of
    shape ``(n,) + teacher.shape``, ``key`` the key for any further noise.
    """

    name: str = ""
    paper: str = ""

    def build(self, teacher: Teacher, **options) -> Setup:
        raise NotImplementedError

    def sample(self, teacher: Teacher, params, noise, *, steps: int, trained_steps: int, cond=None, key=None, **kw):
        raise NotImplementedError


def _run_teacher(run: Run, params, source: str) -> Teacher:
    apply, prediction, time_input = denoiser_apply(run)
    den = run_denoiser((apply, prediction, time_input), run, params)
    return Teacher(
        apply=apply,
        params=jax.tree.map(jnp.asarray, params),
        process=den.process,
        prediction=prediction,
        time_input=time_input,
        shape=tuple(run.data_shape),
        num_classes=int(run.num_classes),
        run=run,
        source=source,
    )


def load_teacher(spec, *, step: int | None = None, ema: bool = True) -> Teacher:
    """The teacher named by ``spec``.

    Args:
      spec: a shipped model's name (``"digits"``, see :data:`jdiff.runs.PRETRAINED`), a
        folder written by :func:`jdiff.runs.export_pretrained` (``params.npz`` +
        ``config.json`` + ``run.json``), or a ``jdiff train`` run directory (its newest
        or ``step``'s checkpoint; EMA parameters unless ``ema=False``).

    Raises:
      DistillError: nothing usable at ``spec`` (the message names what was looked for).
    """
    spec = os.fspath(spec)
    if spec in PRETRAINED:
        folder = pretrained_dir(spec)
    else:
        folder = spec
    if not os.path.isdir(folder):
        raise DistillError(f"teacher {spec!r}: not a shipped model ({', '.join(PRETRAINED)}) and no such folder")
    if os.path.exists(os.path.join(folder, "params.npz")):
        where = f"teacher {folder!r}"
        try:
            cfg = config_from_dict(_read_json(os.path.join(folder, "config.json"), where))
            info = _read_json(os.path.join(folder, "run.json"), where)
            shape, ncls = tuple(int(s) for s in info["data_shape"]), int(info["num_classes"])
            run = _abstract_run(json.dumps(config_to_dict(cfg), sort_keys=True), shape, ncls)
            with np.load(os.path.join(folder, "params.npz"), allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            params = unflatten_params(arrays, run.params, where=where)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise DistillError(f"{where}: {e}") from e
        return _run_teacher(run, params, folder)
    if os.path.isdir(os.path.join(folder, R.CKPT_DIR)):
        try:
            _, _, run, state, _ = R.load_run_state(folder, step)
        except (ValueError, OSError) as e:
            raise DistillError(f"teacher run {folder!r}: {e}") from e
        params = state.ema_params if ema and state.ema_params is not None else state.params
        return _run_teacher(run, to_host(params), folder)
    raise DistillError(
        f"teacher {spec!r}: the folder holds neither a shipped model (params.npz, config.json, run.json) "
        f"nor a jdiff train run ({R.CKPT_DIR}/)"
    )
