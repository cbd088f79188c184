"""The pure train step: optax update, gradient accumulation, EMA.

``train_step(state, batch, key) -> (state, metrics)`` is a pure function of pytrees. The
optimizer is an optax ``GradientTransformation`` (:func:`make_optimizer`: global-norm
clipping then AdamW under linear warmup and cosine decay, Loshchilov & Hutter,
"Decoupled Weight Decay Regularization", ICLR 2019; "SGDR", ICLR 2017). Gradient
accumulation is a ``lax.scan`` over ``k`` micro-batches inside the step: since the
loss is a mean over samples and every sample's randomness comes from its own key, the
mean of the micro-batch gradients *is* the full-batch gradient, and one accumulated
step equals one full-batch step (up to float summation order). The EMA of the
parameters lives in the state.

Frozen parameters (a DPO reference model, a distillation teacher) live in the state
too, as ``state.frozen``: the step passes them to the loss as
``loss_fn(params, batch, keys, frozen=frozen)``, replicates them over the mesh with the
rest of the state and checkpoints them with it, and takes no gradient of them and never
updates them. Without frozen parameters (``frozen=None``, the default) the loss is
called ``loss_fn(params, batch, keys)`` as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdiff._random import per_sample_keys
from jdiff.train._parallel import (
    check_batch_divisible,
    data_sharding,
    make_mesh,
    replicate,
    replicated_sharding,
    shard_batch,
)

__all__ = [
    "TrainState",
    "init_train_state",
    "make_optimizer",
    "lr_schedule",
    "ema_decay_at",
    "ema_update",
    "train_step",
    "make_train_step",
    "state_key",
]


class TrainState(NamedTuple):
    """Everything a run needs to continue exactly.

    Attributes:
      step: int32 scalar, number of optimizer updates done.
      params: the parameter pytree.
      opt_state: the optax state.
      ema_params: exponential moving average of ``params`` (``None`` without EMA).
      rng: raw ``uint32[2]`` key data of the run's base key; the key of step ``n`` is
        ``fold_in(rng, n)`` (:func:`state_key`), so it never needs to be split or saved
        twice.
      frozen: parameters the loss reads but training never changes (a reference model,
        a teacher), or ``None``. Passed to the loss as ``frozen=``; no gradient, no
        optimizer state, no EMA; replicated and checkpointed like ``params``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    frozen: Any = None


def _raw_key(seed):
    """Raw ``uint32[2]`` key data from an int seed, a typed key or raw key data."""
    if isinstance(seed, (int, np.integer)):
        return jnp.asarray(jax.random.PRNGKey(int(seed)), jnp.uint32)
    if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        seed = jax.random.key_data(seed)
    return jnp.asarray(seed, jnp.uint32)


def init_train_state(
    params, optimizer: optax.GradientTransformation, seed, *, ema: bool = True, frozen=None
) -> TrainState:
    """A fresh :class:`TrainState` at step 0. ``seed`` is an int or a key (typed or raw);
    ``frozen`` is an optional pytree of parameters the loss reads and training never
    updates (see :class:`TrainState`)."""
    params = jax.tree.map(jnp.asarray, params)
    ema_params = jax.tree.map(jnp.copy, params) if ema else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=ema_params,
        rng=_raw_key(seed),
        frozen=None if frozen is None else jax.tree.map(jnp.asarray, frozen),
    )


def state_key(state: TrainState):
    """The key of the next step, ``fold_in(rng, step)``."""
    return jax.random.fold_in(state.rng, state.step)


# ------------------------------------------------------------------------- optax


def lr_schedule(
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_lr: float = 0.0,
    init_lr: float = 0.0,
    extensions: Sequence[tuple[int, int]] = (),
) -> optax.Schedule:
    """Linear warmup from ``init_lr`` to ``learning_rate`` over ``warmup_steps``, then a
    cosine decay to ``final_lr`` at ``total_steps`` (constant if ``total_steps`` is None).

    ``extensions``: ``((at_step, new_total_steps), ...)`` with non-decreasing
    ``at_step``, for a run whose total number of steps was changed when it was at
    ``at_step``. The schedule in force holds up to ``at_step``; from there the *rest of
    the cosine* is re-planned: the cosine continues from the phase it had reached at
    ``at_step`` (the learning rate reached there) and arrives at ``final_lr`` exactly at
    ``new_total_steps``, stretched or compressed over the new number of remaining steps.
    The learning rate is therefore continuous (no restart of the warmup or the decay)
    and keeps decreasing monotonically. An extension of a finished run (``at_step >=``
    the total in force) continues at ``final_lr``; one made during the warmup only moves
    the end of the decay. Extensions chain: each one re-plans what the previous one left.
    Without a cosine (``total_steps=None``) the learning rate stays constant and
    extensions change nothing. Without extensions the schedule is exactly the plain
    one. The schedule is a function of the step count only, so an optax state built
    with the original schedule continues unchanged under the extended one.
    """
    if learning_rate < 0 or warmup_steps < 0:
        raise ValueError("learning_rate and warmup_steps must be non-negative")
    extensions = tuple((int(a), int(n)) for a, n in extensions)
    prev = -1
    for a, n in extensions:
        if a < 0 or a < prev:
            raise ValueError(f"extensions need non-negative, non-decreasing steps, got {list(extensions)}")
        if n <= a:
            raise ValueError(f"an extension at step {a} needs a new total above it, got {n}")
        prev = a
    if total_steps is None:
        if warmup_steps == 0:
            return optax.constant_schedule(learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(init_lr, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
            [warmup_steps],
        )
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    rest = list(extensions)
    while rest and rest[0][0] <= warmup_steps:  # changed during the warmup: the decay just ends elsewhere
        total_steps = rest.pop(0)[1]
        if total_steps <= warmup_steps:
            raise ValueError(f"an extension's total ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    base = optax.warmup_cosine_decay_schedule(init_lr, learning_rate, warmup_steps, total_steps, final_lr)
    if not rest:
        return base
    # Re-planned cosine pieces (start step, phase at start, end step): from ``start`` on,
    # lr = final + (peak - final) (1 + cos(theta)) / 2 with theta going linearly from the
    # phase reached at ``start`` to pi at ``end``.
    pieces: list[tuple[int, float, int]] = []
    start, theta, end = warmup_steps, 0.0, total_steps
    for a, n in rest:
        if pieces and a == start:  # a second change at the same step replaces the first
            pieces[-1] = (start, theta, n)
        else:
            theta = math.pi if a >= end else theta + (math.pi - theta) * (a - start) / (end - start)
            pieces.append((a, theta, n))
        start, end = a, n
    amp = learning_rate - final_lr

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        lr = base(count)
        for s0, th, s1 in pieces:
            phase = th + (math.pi - th) * jnp.clip((count - s0) / (s1 - s0), 0.0, 1.0)
            lr = jnp.where(count >= s0, final_lr + amp * 0.5 * (1.0 + jnp.cos(phase)), lr)
        return lr

    return schedule


def make_optimizer(
    learning_rate: float | optax.Schedule = 1e-4,
    *,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_lr: float = 0.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
    extensions: Sequence[tuple[int, int]] = (),
) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip_norm)`` then AdamW with :func:`lr_schedule` (or a given
    schedule). ``clip_norm=None`` disables clipping. ``extensions`` continue the schedule
    of a run whose total step count was changed (see :func:`lr_schedule`); they need a
    float ``learning_rate``, not a schedule."""
    if callable(learning_rate) and extensions:
        raise ValueError("extensions apply to lr_schedule's plan; pass a float learning_rate, not a schedule")
    sched = (
        learning_rate
        if callable(learning_rate)
        else lr_schedule(
            learning_rate, warmup_steps=warmup_steps, total_steps=total_steps, final_lr=final_lr, extensions=extensions
        )
    )
    parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    return tx


# --------------------------------------------------------------------------- EMA


def ema_decay_at(step, decay: float, warmup: bool = False):
    """The EMA decay used for the update that produces step ``step`` (1-based).

    With ``warmup`` it is ``min(decay, (1 + step) / (10 + step))`` (the ``num_updates``
    rule of TensorFlow's ``ExponentialMovingAverage``), which lets the average forget
    the random initialization quickly; otherwise the constant ``decay``."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay):
    """``ema <- decay * ema + (1 - decay) * params``, leaf by leaf, in each leaf's dtype."""

    def upd(e, p):
        d = jnp.asarray(decay, e.dtype) if jnp.issubdtype(e.dtype, jnp.floating) else decay
        return (d * e + (1 - d) * p).astype(e.dtype)

    return jax.tree.map(upd, ema, params)


# --------------------------------------------------------------------- the step


def _batch_size(batch) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("empty batch")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every batch leaf needs the same leading batch axis, got sizes {sorted(map(str, sizes))}")
    return sizes.pop()


def train_step(
    state: TrainState,
    batch,
    key,
    *,
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    accum_steps: int = 1,
    ema_decay: float | None = 0.9999,
    ema_warmup: bool = False,
    schedule: optax.Schedule | None = None,
    micro_sharding: NamedSharding | None = None,
):
    """One optimizer update; pure (jit it, or use :func:`make_train_step`).

    Arguments:
      state: a :class:`TrainState`.
      batch: pytree of arrays with a leading batch axis ``B`` (the global batch).
      key: the step's key (``None``: :func:`state_key`). Sample ``i`` of the batch gets
        ``fold_in(key, i)`` whatever ``accum_steps`` is.
      loss_fn: ``loss_fn(params, batch, keys) -> (loss, metrics)`` accepting ``B``
        per-sample keys (as built by :func:`make_loss_fn`); when ``state.frozen`` is not
        None it is called ``loss_fn(params, batch, keys, frozen=state.frozen)``, and the
        gradient is taken with respect to ``params`` only. A loss with the attribute
        ``reads_ema = True`` is also given ``ema=stop_gradient(state.ema_params)``
        (``None`` without EMA: a consistency-distillation target), one with
        ``reads_step = True`` ``step=state.step`` (the updates done before this one: a
        training curriculum).
      optimizer: optax transformation.
      accum_steps: split the batch into this many micro-batches (rows ``j, j + k, j +
        2k, ...``) and average their gradients in a ``lax.scan``; equals the full-batch
        step.
      ema_decay: EMA decay, or ``None`` to leave ``ema_params`` untouched.
      ema_warmup: use :func:`ema_decay_at`'s warmup.
      schedule: the learning-rate schedule, only to report ``lr`` in the metrics.

    Returns:
      ``(new_state, metrics)``; metrics hold the loss function's metrics (batch means),
      ``grad_norm`` (before clipping) and ``lr`` when ``schedule`` is given.
    """
    if key is None:
        key = state_key(state)
    B = _batch_size(batch)
    k = int(accum_steps)
    if k < 1 or B % k:
        raise ValueError(f"batch size {B} is not divisible by accum_steps={k}")
    keys = per_sample_keys(key, B)
    frozen = state.frozen
    extra = {} if frozen is None else {"frozen": frozen}
    if getattr(loss_fn, "reads_ema", False):  # a loss whose target is the EMA (consistency distillation)
        extra["ema"] = None if state.ema_params is None else jax.lax.stop_gradient(state.ema_params)
    if getattr(loss_fn, "reads_step", False):  # a loss with a curriculum over training (iCT, ECT)
        extra["step"] = state.step
    if not extra:
        objective = loss_fn
    else:

        def objective(params, batch, keys):
            return loss_fn(params, batch, keys, **extra)

    # differentiated with respect to params only: frozen is a constant of the objective
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    if k == 1:
        (_, metrics), grads = grad_fn(state.params, batch, keys)
    else:

        def split(x):
            x = x.reshape((B // k, k) + x.shape[1:])
            x = jnp.swapaxes(x, 0, 1)
            if micro_sharding is not None:
                spec = P(None, *micro_sharding.spec)
                x = jax.lax.with_sharding_constraint(x, NamedSharding(micro_sharding.mesh, spec))
            return x

        micro = jax.tree.map(split, (batch, keys))

        def body(acc, mb):
            (_, m), g = grad_fn(state.params, mb[0], mb[1])
            return jax.tree.map(jnp.add, acc, (g, m)), None

        zeros_g = jax.tree.map(jnp.zeros_like, state.params)
        m_shape = jax.eval_shape(lambda: grad_fn(state.params, *jax.tree.map(lambda x: x[0], micro))[0][1])
        zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
        (gsum, msum), _ = jax.lax.scan(body, (zeros_g, zeros_m), micro)
        grads = jax.tree.map(lambda g: g / k, gsum)
        metrics = jax.tree.map(lambda m: m / k, msum)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    ema = state.ema_params
    if ema is not None and ema_decay is not None:
        ema = ema_update(ema, params, ema_decay_at(step, ema_decay, ema_warmup))
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if schedule is not None:
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    return TrainState(step, params, opt_state, ema, state.rng, frozen), metrics


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    accum_steps: int = 1,
    ema_decay: float | None = 0.9999,
    ema_warmup: bool = False,
    schedule: optax.Schedule | None = None,
    donate: bool = True,
) -> Callable:
    """Compile :func:`train_step` for data parallelism on ``mesh`` (default: every device).

    Returns ``step(state, batch, key=None) -> (state, metrics)``. The state is kept
    replicated, the batch is sharded along the mesh's data axis and XLA averages the
    gradients across devices (and hosts). The same function runs on 1 or N devices and
    gives the same result up to float summation order. ``batch`` is a pytree of global
    arrays from :func:`shard_batch`; leaves that are not yet sharded that way are taken
    as this process's slice and sharded on the way in (in a single process: the whole
    batch). A state not yet replicated on ``mesh`` is replicated first. Raises
    ``ValueError`` if the batch (or each micro-batch) does not divide evenly over the
    data axis.

    Frozen parameters travel in the state (``init_train_state(..., frozen=...)``):
    replicated like the parameters, passed to ``loss_fn`` as ``frozen=``, and held once
    in memory: the compiled program (``step.jitted(state_without_frozen, frozen, batch,
    key)``) takes them as a separate argument that is neither donated nor returned, and
    ``step`` puts the very same arrays (the same device buffers) back into the new state,
    so they are never copied, re-sent or rebuilt from step to step.
    """
    mesh = make_mesh() if mesh is None else mesh
    n_data = mesh.devices.size
    rep = replicated_sharding(mesh)
    dat = data_sharding(mesh)

    def fn(state, frozen, batch, key):
        new, metrics = train_step(
            state._replace(frozen=frozen),
            batch,
            key,
            loss_fn=loss_fn,
            optimizer=optimizer,
            accum_steps=accum_steps,
            ema_decay=ema_decay,
            ema_warmup=ema_warmup,
            schedule=schedule,
            micro_sharding=dat,
        )
        return new._replace(frozen=None), metrics

    # The frozen parameters are an argument of their own, read-only: never donated and
    # never an output, so the program neither copies them nor writes a new buffer for
    # them, and the step hands back the very arrays it was given (one copy per device,
    # placed once, for the whole run).
    jitted = jax.jit(
        fn, in_shardings=(rep, rep, dat, rep), out_shardings=(rep, rep), donate_argnums=(0,) if donate else ()
    )

    def step(state: TrainState, batch, key=None):
        _batch_size(batch)
        # Both are no-ops for arrays already placed; they keep one compiled program.
        state = replicate(state, mesh)
        batch = shard_batch(batch, mesh)
        B = _batch_size(batch)
        check_batch_divisible(B, n_data)
        if accum_steps > 1:
            if B % accum_steps:
                raise ValueError(f"batch size {B} is not divisible by accum_steps={accum_steps}")
            check_batch_divisible(B // accum_steps, n_data, f"micro-batch (batch {B} / accum_steps {accum_steps})")
        if key is None:
            key = state_key(state)
        frozen, rest = state.frozen, state._replace(frozen=None)
        if donate and frozen is not None:
            # an array that is both trained (donated) and frozen (e.g. the reference given
            # as the very arrays of the starting parameters) gets its own frozen copy, once
            mine = {id(x) for x in jax.tree.leaves(rest)}
            if any(id(x) in mine for x in jax.tree.leaves(frozen)):
                frozen = replicate(jax.tree.map(jnp.copy, frozen), mesh)
        new, metrics = jitted(rest, frozen, batch, key)
        return new._replace(frozen=frozen), metrics

    step.jitted = jitted
    step.mesh = mesh
    return step
