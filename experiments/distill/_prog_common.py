"""Shared by experiments/distill/{progressive,guided,mmd}.py: the digits teacher, training
batches, saving a student, and the FD-digits / accuracy rows measured as
scripts/check_pretrained_digits.py does (1,000 class-conditional samples, labels cycling
0..9, FD-digits against the held-out real digits)."""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from jdiff._random import normal_per_sample
from jdiff.distill import load_teacher
from jdiff.features import digits as F
from jdiff.metrics import frechet_distance
from jdiff.runs._pretrained import flatten_params


def teacher_and_data():
    """The shipped digits teacher and its training data ``(x (n, 8, 8, 1), labels (n,))``."""
    teacher = load_teacher("digits")
    x, labels, _ = teacher.run.cfg.data.load()
    return teacher, np.asarray(x, np.float32), np.asarray(labels, np.int32)


def batches(x, labels, batch_size: int, seed: int = 0):
    """``step -> {"x", "label"}``: a random batch of the data, a function of the step only."""

    def get(step):
        idx = np.random.default_rng([seed, step]).choice(len(x), batch_size, replace=False)
        return {"x": x[idx], "label": labels[idx]}

    return get


def save(params, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **{k: np.asarray(v) for k, v in flatten_params(params).items()})
    return path


class Evaluator:
    """FD-digits (vs the held-out real digits) and class accuracy of 1,000 samples."""

    def __init__(self, num: int = 1000, seed: int = 0):
        self.clf = F.digits_classifier()
        _, _, xte, _ = F.digits_split()
        self.ref = self.clf.stats(xte)
        self.labels = np.arange(num, dtype=np.int32) % 10
        self.noise = normal_per_sample(jax.random.key(seed), (num, *F.IMAGE_SHAPE))

    def row(self, name: str, steps: int, sample_fn, train_s: float | None = None) -> str:
        """``sample_fn(noise, labels, steps) -> images``; prints and returns one table row."""
        t0 = time.perf_counter()
        x = np.asarray(sample_fn(self.noise, self.labels, steps))
        dt = time.perf_counter() - t0
        fd = frechet_distance(*self.clf.stats(x), *self.ref)
        acc = self.clf.accuracy(x, self.labels)
        tr = "-" if train_s is None else f"{train_s:.0f}"
        line = f"| {name} | {steps} | {fd:.3f} | {acc:.4f} | {tr} | {dt:.0f} |"
        print(line, flush=True)
        return line


HEADER = (
    "| student | NFE | FD-digits (held-out) | accuracy | train wall s (cumulative) | sampling s |\n"
    "|---|---|---|---|---|---|"
)
