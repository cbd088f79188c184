"""Shared by the digits runs of this folder: train a :class:`jdiff.distill.Setup` with
:func:`jdiff.train.train` and measure a student as ``scripts/check_pretrained_digits.py``
measures the shipped model (1,000 class-conditional samples, labels cycling 0..9,
FD-digits against the held-out real digits and the training split, class accuracy)."""

from __future__ import annotations

import inspect
import os
import time

import jax
import numpy as np

from jdiff._random import per_sample_keys
from jdiff.features import digits as F
from jdiff.metrics import frechet_distance
from jdiff.train import make_optimizer, train

OUT = "/tmp/flow"


def fit(setup, *, steps: int, batch: int = 64, lr: float = 3e-4, b1: float = 0.9, seed: int = 0, log_every: int = 50):
    """Train ``setup`` for ``steps`` updates; returns ``(ema_params, wall_seconds)``.

    The loss reads its pairs (or draws its own noise) from ``setup.frozen``; the batch
    carries the labels (cycling classes, shuffled per step) and, for a ``batch_fn`` that
    takes it, the step."""
    takes_step = setup.batch_fn is not None and "step" in inspect.signature(setup.batch_fn).parameters

    def data(step):
        labels = np.random.default_rng([seed, step]).permutation(np.arange(batch) % 10).astype(np.int32)
        x = np.zeros((batch, 8, 8, 1), np.float32)
        if setup.batch_fn is None:
            return {"x": x, "label": labels}
        return setup.batch_fn(x, labels, step=step) if takes_step else setup.batch_fn(x, labels)

    opt = make_optimizer(lr, warmup_steps=min(50, steps // 10), total_steps=steps, final_lr=lr / 10, b1=b1)
    t0 = time.perf_counter()
    res = train(
        setup.loss_fn,
        setup.params,
        data,
        steps,
        optimizer=opt,
        frozen=setup.frozen,
        ema_decay=0.995,
        ema_warmup=True,
        seed=seed,
        log_every=log_every,
    )
    wall = time.perf_counter() - t0
    return jax.device_get(res.state.ema_params), wall


def save(params, name: str) -> str:
    os.makedirs(OUT, exist_ok=True)
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    path = os.path.join(OUT, f"{name}.npz")
    np.savez(path, **flat)
    return path


def evaluate(
    recipe,
    teacher,
    params,
    step_counts,
    trained_steps,
    *,
    num: int = 1000,
    seed: int = 0,
    label: str = "",
    wall: float = 0.0,
    batch: int = 250,
):
    """One table row per step count: NFE, FD-digits vs held-out and vs train, accuracy,
    training wall time."""
    clf = F.digits_classifier()
    xtr, _, xte, yte = F.digits_split()
    ref_te, ref_tr = clf.stats(xte), clf.stats(xtr)
    labels = np.arange(num, dtype=np.int32) % 10
    keys = per_sample_keys(jax.random.fold_in(jax.random.key(seed), 0), num)
    noise = np.asarray(teacher.process.prior_sample(keys, (num, *teacher.shape)))  # as jdiff.generate draws it
    rows = []
    for k in step_counts:
        out = [
            np.asarray(
                recipe.sample(
                    teacher,
                    params,
                    noise[i : i + batch],
                    steps=k,
                    trained_steps=trained_steps,
                    cond=labels[i : i + batch],
                )
            )
            for i in range(0, num, batch)
        ]
        x = np.concatenate(out)
        s = clf.stats(x)
        row = (
            f"| {label} | {k} | {frechet_distance(*s, *ref_te):.3f} | {frechet_distance(*s, *ref_tr):.3f} | "
            f"{clf.accuracy(x, labels):.4f} | {wall:.0f} s |"
        )
        print(row, flush=True)
        rows.append(row)
    return rows


HEADER = (
    "| student | NFE | FD-digits vs held-out | vs train | accuracy | training wall (pairs included) |\n"
    "|---|---|---|---|---|---|"
)
