"""Training settings as plain dataclasses: the optimizer (:class:`OptimizerConfig`),
the parameter EMA (:class:`EMAConfig`) and the loop (:class:`TrainConfig`).

They hold numbers only (JSON-friendly); :meth:`OptimizerConfig.build` turns them into
the optax transformation and learning-rate schedule of :func:`make_optimizer` /
:func:`lr_schedule`. The ``jdiff`` command line uses them as its ``optim``, ``ema``
and ``train`` sections.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

__all__ = ["OptimizerConfig", "EMAConfig", "TrainConfig"]


def _positive_int(name: str, v: int, minimum: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """``clip_by_global_norm(clip_norm)`` then AdamW, under a linear warmup and (with
    ``schedule="cosine"``) a cosine decay to ``final_lr`` at the last step.

    Attributes:
      lr: peak learning rate (finite, > 0).
      warmup_steps: linear warmup steps (at most ``total_steps - 1`` are used).
      schedule: ``"cosine"`` (decay to ``final_lr`` at the last step) or ``"constant"``.
      final_lr: learning rate at the last step (cosine).
      weight_decay, b1, b2, eps: AdamW settings.
      clip_norm: global-norm gradient clipping (None: off).
      accum_steps: gradient-accumulation micro-batches per step.
    """

    lr: float = 1e-3
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    final_lr: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    accum_steps: int = 1

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite positive number, got {self.lr!r}")
        if not (math.isfinite(self.final_lr) and self.final_lr >= 0):
            raise ValueError(f"final_lr must be finite and >= 0, got {self.final_lr!r}")
        _positive_int("warmup_steps", self.warmup_steps, 0)
        _positive_int("accum_steps", self.accum_steps)
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay!r}")
        for name in ("b1", "b2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be finite and > 0, got {self.eps!r}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0 or None, got {self.clip_norm!r}")

    def schedule_fn(self, total_steps: int):
        """The learning-rate schedule of a run of ``total_steps`` steps."""
        from jdiff.train._step import lr_schedule

        warmup = min(self.warmup_steps, max(total_steps - 1, 0))  # short runs keep a preset's warmup
        total = total_steps if self.schedule == "cosine" else None
        return lr_schedule(self.lr, warmup_steps=warmup, total_steps=total, final_lr=self.final_lr)

    def build(self, total_steps: int):
        """``(optax transformation, learning-rate schedule)`` for ``total_steps`` steps."""
        from jdiff.train._step import make_optimizer

        sched = self.schedule_fn(total_steps)
        tx = make_optimizer(
            sched, weight_decay=self.weight_decay, b1=self.b1, b2=self.b2, eps=self.eps, clip_norm=self.clip_norm
        )
        return tx, sched


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    """EMA of the parameters: ``decay`` in [0, 1) or None (no EMA); ``warmup`` uses
    ``min(decay, (1 + n) / (10 + n))``."""

    decay: float | None = 0.999
    warmup: bool = True

    def __post_init__(self):
        if self.decay is not None and not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1) or None, got {self.decay!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: steps, global batch size, seed, logging and checkpoints.

    Attributes:
      steps: total optimizer steps.
      batch_size: global batch size (all processes together).
      seed: seed of the training randomness (times, noise, dropout).
      log_every: log the metrics every this many steps.
      checkpoint_every: save a checkpoint every this many steps (and at the end).
      keep: checkpoints to keep.
      grid_every: write a sample grid every this many steps (0: only at the end).
      async_checkpointing: write checkpoints in the background.
    """

    steps: int = 1000
    batch_size: int = 128
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep: int = 3
    grid_every: int = 500
    async_checkpointing: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep"):
            _positive_int(name, getattr(self, name))
        _positive_int("grid_every", self.grid_every, 0)
        _positive_int("seed", self.seed, 0)
