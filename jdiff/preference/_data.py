"""Preference data: pairs (winner, loser, conditioning) or labelled single samples, a
deterministic multi-host loader, and a generator from any reward function applied to
the model's own samples.

Every check runs on the host before anything is traced or trained, with a message that
names the offending field and its shape or values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.data import Loader

__all__ = [
    "PreferencePairs",
    "LabelledSamples",
    "check_pairs",
    "check_labelled",
    "preference_loader",
    "pairs_from_rewards",
    "generate_pairs",
]


class PreferencePairs(NamedTuple):
    """Pairs of samples with the preferred one first.

    Attributes:
      win: ``(N, ...)`` preferred samples; lose: ``(N, ...)`` dispreferred samples, same shape.
      cond: ``(N,)`` integer class labels (the conditioning both were generated under), or None.
      reward_win, reward_lose: ``(N,)`` the rewards that ranked them, or None.
    """

    win: Any
    lose: Any
    cond: Any = None
    reward_win: Any = None
    reward_lose: Any = None


class LabelledSamples(NamedTuple):
    """Unpaired samples labelled desirable (True) or undesirable (False) (Diffusion-KTO).

    Attributes:
      x: ``(N, ...)`` samples; desirable: ``(N,)`` booleans; cond: ``(N,)`` labels or None.
    """

    x: Any
    desirable: Any
    cond: Any = None


def _array(name, a):
    if a is None:
        raise ValueError(f"preference data: {name} is missing")
    a = np.asarray(a)
    if a.ndim < 1 or a.shape[0] == 0:
        raise ValueError(f"preference data: {name} is empty (shape {a.shape})")
    return a


def _check_cond(cond, n, num_classes):
    if cond is None:
        return None
    c = np.asarray(cond)
    if c.shape != (n,) or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"preference data: cond must be ({n},) integer labels, got {c.dtype}{list(c.shape)}")
    if num_classes is not None:
        bad = (c < 0) | (c >= num_classes)
        if np.any(bad):
            raise ValueError(
                f"preference data: labels must be in [0, {num_classes}), got {sorted(set(c[bad].tolist()))[:8]} "
                f"at rows {np.flatnonzero(bad)[:8].tolist()}"
            )
    return c.astype(np.int32)


def _check_float(name, a):
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"preference data: {name} must be floating point, got {a.dtype}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"preference data: {name} has {int(np.sum(~np.isfinite(a)))} non-finite values")


def check_pairs(pairs: PreferencePairs, *, num_classes: int | None = None, shape=None) -> PreferencePairs:
    """Validate preference pairs and return them as numpy arrays.

    Args:
      pairs: a :class:`PreferencePairs`.
      num_classes: labels must lie in ``[0, num_classes)`` when given.
      shape: the per-sample shape the model takes, checked when given.

    Raises:
      ValueError: a missing winner or loser, an empty set, winners and losers of
        different shapes, a per-sample shape other than ``shape``, non-float or
        non-finite samples, labels of the wrong shape, dtype or range, rewards of the
        wrong shape (each message names the field).
      TypeError: not a :class:`PreferencePairs`.
    """
    if not isinstance(pairs, PreferencePairs):
        raise TypeError(f"expected PreferencePairs, got {type(pairs).__name__}")
    w, l = _array("win", pairs.win), _array("lose", pairs.lose)
    if w.shape != l.shape:
        raise ValueError(f"preference data: win {list(w.shape)} and lose {list(l.shape)} differ in shape")
    if shape is not None and tuple(w.shape[1:]) != tuple(shape):
        raise ValueError(f"preference data: samples are {list(w.shape[1:])}, the model takes {list(shape)}")
    _check_float("win", w)
    _check_float("lose", l)
    n = w.shape[0]
    cond = _check_cond(pairs.cond, n, num_classes)
    rewards = []
    for name in ("reward_win", "reward_lose"):
        r = getattr(pairs, name)
        if r is not None:
            r = np.asarray(r)
            if r.shape != (n,):
                raise ValueError(f"preference data: {name} must be ({n},), got {list(r.shape)}")
        rewards.append(r)
    return PreferencePairs(w, l, cond, *rewards)


def check_labelled(data: LabelledSamples, *, num_classes: int | None = None, shape=None) -> LabelledSamples:
    """Validate labelled samples (as :func:`check_pairs`); ``desirable`` must be ``(N,)``
    booleans or 0/1 integers.

    Raises:
      ValueError: missing or empty samples, labels of the wrong shape or range, a
        ``desirable`` that is not ``(N,)`` 0/1; TypeError: not a :class:`LabelledSamples`.
    """
    if not isinstance(data, LabelledSamples):
        raise TypeError(f"expected LabelledSamples, got {type(data).__name__}")
    x = _array("x", data.x)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"preference data: samples are {list(x.shape[1:])}, the model takes {list(shape)}")
    _check_float("x", x)
    n = x.shape[0]
    d = _array("desirable", data.desirable)
    if d.shape != (n,):
        raise ValueError(f"preference data: desirable must be ({n},), got {list(d.shape)}")
    if d.dtype != bool:
        if not np.issubdtype(d.dtype, np.integer) or not np.all((d == 0) | (d == 1)):
            raise ValueError(f"preference data: desirable must be booleans or 0/1, got {d.dtype} {np.unique(d)[:8]}")
        d = d.astype(bool)
    return LabelledSamples(x, d, _check_cond(data.cond, n, num_classes))


def preference_loader(
    data, global_batch_size: int, *, seed: int = 0, num_classes=None, shape=None, label_key: str = "label", **kw
):
    """A :class:`jdiff.data.Loader` over validated preference data, yielding the batch
    dicts :func:`jdiff.preference.make_preference_loss` reads: ``{"win", "lose",
    label_key}`` for pairs, ``{"x", "desirable", label_key}`` for labelled samples.

    The loader is deterministic in ``(seed, epoch)``, resumable, and multi-host: each
    process reads its contiguous rows of every global batch (see
    :class:`jdiff.data.Loader`; ``**kw`` are its options, e.g. ``process_index``).

    Raises:
      ValueError: malformed data (see :func:`check_pairs` / :func:`check_labelled`), a
        batch larger than the data set; TypeError: another kind of data.
    """
    if isinstance(data, PreferencePairs):
        d = check_pairs(data, num_classes=num_classes, shape=shape)
        arrays = {"win": d.win, "lose": d.lose}
        n = d.win.shape[0]
    elif isinstance(data, LabelledSamples):
        d = check_labelled(data, num_classes=num_classes, shape=shape)
        arrays = {"x": d.x, "desirable": d.desirable}
        n = d.x.shape[0]
    else:
        raise TypeError(f"expected PreferencePairs or LabelledSamples, got {type(data).__name__}")
    if d.cond is not None:
        arrays[label_key] = d.cond
    if global_batch_size > n:
        raise ValueError(f"preference data: batch size {global_batch_size} exceeds the {n} examples")
    return Loader(arrays, global_batch_size, seed=seed, **kw)


def pairs_from_rewards(samples, rewards, cond=None) -> PreferencePairs:
    """Pairs from candidates: ``samples`` ``(N, K, ...)`` are K candidates for each of N
    conditions (``cond`` ``(N,)``), ``rewards`` ``(N, K)`` their rewards; each condition
    gives the pair (best candidate, worst candidate). Ties keep the first candidate as
    the winner; pairs whose rewards tie exactly are dropped."""
    x, r = np.asarray(samples), np.asarray(rewards, np.float64)
    if x.ndim < 2 or r.shape != x.shape[:2] or r.shape[1] < 2:
        raise ValueError(f"need samples (N, K >= 2, ...) and rewards (N, K), got {x.shape} and {r.shape}")
    best, worst = np.argmax(r, axis=1), np.argmin(r, axis=1)
    keep = r[np.arange(len(r)), best] > r[np.arange(len(r)), worst]
    i = np.flatnonzero(keep)
    c = None if cond is None else np.asarray(cond)[i]
    return PreferencePairs(x[i, best[i]], x[i, worst[i]], c, r[i, best[i]], r[i, worst[i]])


def generate_pairs(
    sample_fn: Callable, reward_fn: Callable, key, cond, *, candidates: int = 2, batch: int = 256
) -> PreferencePairs:
    """Preference pairs from the model's own samples, ranked by any reward.

    Args:
      sample_fn: ``sample_fn(key, cond) -> samples (B, ...)``: the model's sampler (one
        sample per label in ``cond``, its noise from ``key``), e.g. a jitted
        :func:`jdiff.sample` call on ``jdiff.prior_sample(process, key, ...)``.
      reward_fn: ``reward_fn(samples, cond) -> (B,)`` rewards (higher is preferred).
      key: PRNG key; candidate ``k`` of every condition uses ``fold_in(key, k)``.
      cond: ``(N,)`` integer labels (one pair per label).
      candidates: samples drawn per condition (>= 2); the best and the worst make the pair.
      batch: labels per call of ``sample_fn``.

    Returns:
      :class:`PreferencePairs` (numpy) with their rewards; pairs with equal rewards dropped.
    """
    if candidates < 2:
        raise ValueError(f"candidates must be >= 2, got {candidates}")
    cond = np.asarray(cond)
    if cond.ndim != 1 or cond.size == 0:
        raise ValueError(f"cond must be a non-empty (N,) array of labels, got shape {cond.shape}")
    xs, rs = [], []
    for k in range(candidates):
        kk = jax.random.fold_in(key, k)
        parts, rew = [], []
        for s in range(0, cond.size, batch):
            c = jnp.asarray(cond[s : s + batch])
            x = sample_fn(jax.random.fold_in(kk, s), c)
            parts.append(np.asarray(x))
            rew.append(np.asarray(reward_fn(x, c)))
        xs.append(np.concatenate(parts))
        rs.append(np.concatenate(rew))
    return pairs_from_rewards(np.stack(xs, 1), np.stack(rs, 1), cond)
