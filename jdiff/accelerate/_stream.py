"""Stream batching: denoise a stream of inputs at staggered timesteps in one batch
(StreamDiffusion: Kodaira et al., "StreamDiffusion: A Pipeline-level Solution for
Real-time Interactive Generation", 2023, Sec. 3.1 "Stream Batch").

A sampler of ``N`` steps holds ``N`` slots; slot ``k`` holds an input at step ``k``.
Each pipeline tick runs every slot one solver step with ONE batched network call (each
slot at its own time), emits the slot that finished its ``N``-th step and admits the
next input at step 0. After ``N - 1`` ticks of filling, every tick emits one output, so
a stream of ``M`` inputs takes ``M + N - 1`` ticks of one batched call each, against
``N`` batched calls of a batch of ``M`` for :func:`jdiff.sample`: the pipeline trades
the waiting for a whole batch (latency ``N`` calls per output) for a steady rate of one
output per call.

The slots are per-sample solver states stacked on a leading axis and stepped with
``jax.vmap(solver.step)``: under ``vmap`` the denoiser's one call per slot becomes one
call on the whole stack with per-slot times, and every solver's per-step tables and
history (a multistep solver's past outputs) stay per slot. So every deterministic solver
of the registry works (a multi-evaluation solver makes its evaluations batched too).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff._sample import _CastInput, check_inputs, sample
from jdiff.solvers._base import Solver, compute_dtype

__all__ = ["stream", "StreamInfo", "StreamThroughput", "stream_throughput"]


class StreamInfo(NamedTuple):
    """What :func:`stream` returns besides the outputs with ``return_info=True``.

    Attributes:
      slots: the pipeline's batch: one slot per step, ``N``.
      ticks: pipeline ticks, ``M + N - 1`` for ``M`` inputs; each makes the batched
        network calls of one solver step (one for a one-call-per-step solver).
      nfe: ``(M,)`` network calls spent on each output (int32), as
        :attr:`jdiff.SampleInfo.nfe` counts them for one sample.
      grid: the time grid.
    """

    slots: int
    ticks: int
    nfe: jax.Array
    grid: jax.Array


def _split_cond(cond, M):
    """``(per_sample_leaves, rebuild)``: the array leaves with a leading batch axis are
    streamed; the others (scalars, non-arrays) are passed unchanged to every call."""
    leaves, treedef = jax.tree.flatten(cond)
    streamed = [k for k, a in enumerate(leaves) if jnp.ndim(a) >= 1]

    def rebuild(per_sample):
        out = list(leaves)
        for k, a in zip(streamed, per_sample):
            out[k] = a
        return jax.tree.unflatten(treedef, out)

    return [jnp.asarray(leaves[k]) for k in streamed], rebuild


def _stream_impl(solver, denoiser, x_T, grid, cond):
    in_dtype = x_T.dtype
    dt = compute_dtype(x_T)
    den = denoiser if in_dtype == dt else _CastInput(denoiser, in_dtype)
    process = denoiser.process
    M, N = x_T.shape[0], grid.shape[0] - 1
    per_sample, rebuild = _split_cond(cond, M)

    def pad(a):  # N - 1 dummies after the stream (copies of its last input: valid values)
        return jnp.concatenate([a, jnp.broadcast_to(a[-1:], (N - 1,) + a.shape[1:])], axis=0)

    # ticks see inputs of batch 1: (M + N - 1, 1, ...)
    xs = pad(x_T.astype(dt))[:, None]
    cs = [pad(c)[:, None] for c in per_sample]

    def init(x):
        return solver.init(x, grid, process)

    def one_step(state, c):
        return solver.step(den, state, rebuild(c))

    # before the first tick every slot holds a dummy (the first input, never emitted)
    slots0 = jax.vmap(init)(jnp.broadcast_to(xs[0], (N,) + xs.shape[1:]))
    cslots0 = [jnp.broadcast_to(c[0], (N,) + c.shape[1:]) for c in cs]

    def tick(carry, inp):
        slots, cslots = carry
        x_new, c_new = inp
        admit = lambda new, old: jnp.concatenate([new[None], old[:-1]], axis=0)  # noqa: E731
        slots = jax.tree.map(admit, init(x_new), slots)
        cslots = [admit(n, o) for n, o in zip(c_new, cslots)]
        slots = jax.vmap(one_step)(slots, cslots)
        done = jax.tree.map(lambda a: a[-1], slots)
        return (slots, cslots), (solver.finish(done, in_dtype)[0], done.nfe)

    _, (outs, nfes) = jax.lax.scan(tick, (slots0, cslots0), (xs, cs))
    return outs[N - 1 :], nfes[N - 1 :]


_stream_run = jax.jit(_stream_impl, static_argnames=("solver",))


def stream(
    solver: Solver,
    denoiser,
    x_T,
    grid=None,
    *,
    cond=None,
    nfe: int | None = None,
    grid_kind: str = "default",
    final: str = "t_min",
    return_info: bool = False,
):
    """Denoise the stream ``x_T[0], x_T[1], ...`` through an ``N``-slot pipeline at
    staggered timesteps (StreamDiffusion's stream batch, Kodaira et al. 2023, Sec. 3.1).

    Input ``m`` enters at tick ``m`` and leaves at tick ``m + N - 1``; every tick makes
    the network calls of one solver step for all ``N`` slots in one batch. Output ``m``
    is what :func:`jdiff.sample` returns for ``x_T[m]`` (the same solver steps on the
    same states; only the batch the network sees differs, which can change the last
    bits of a network's output, see ``docs/accelerate.md``).

    Args:
      solver: a deterministic solver (DDIM, Euler, DPM-Solver++(2M), UniPC, ...: any
        whose ``step`` is deterministic; its tables and history are kept per slot).
      denoiser: a denoiser or wrapper (guidance included) that accepts per-sample
        times.
      x_T: ``(M, ...)`` the stream of starting noises, in arrival order.
      grid, nfe, grid_kind, final: as in :func:`jdiff.sample` (the grid of every slot).
      cond: per-input conditioning (array leaves with leading axis ``M``; scalar leaves
        are passed to every call unchanged).
      return_info: also return a :class:`StreamInfo`.

    Returns:
      ``(M, ...)`` outputs in arrival order (dtype of ``x_T``), or ``(outputs, info)``.

    Raises:
      ValueError: a stochastic solver, a solver that runs toward noise, and what
        :func:`jdiff.sample` refuses (grid, ``x_T``, ``cond`` batch).
      TypeError: as :func:`jdiff.sample`.
    """
    if isinstance(solver, Solver) and solver.stochastic:
        raise ValueError(f"stream runs deterministic solvers; {solver.name} is stochastic")
    if isinstance(solver, Solver) and solver.direction != "to_data":
        raise ValueError(f"stream denoises toward the data; {solver.name} runs toward noise")
    x_T, grid, N = check_inputs(solver, denoiser, x_T, grid, cond, None, nfe=nfe, grid_kind=grid_kind, final=final)
    outs, nfes = _stream_run(solver, denoiser, x_T, grid, cond)
    if not return_info:
        return outs
    return outs, StreamInfo(slots=N, ticks=x_T.shape[0] + N - 1, nfe=nfes, grid=grid)


class StreamThroughput(NamedTuple):
    """A throughput measurement of :func:`stream_throughput` (seconds are the best of
    the repeats, after compilation).

    Attributes:
      outputs: ``M``, the samples produced by each method.
      stream_seconds, sample_seconds: wall time of :func:`stream` over the ``M``
        inputs and of :func:`jdiff.sample` on the batch of ``M``.
      stream_calls, sample_calls: batched network calls (passes of the network over a
        batch): ``M + N - 1`` ticks (batch ``N``) and ``N`` steps (batch ``M``), for a
        one-call-per-step solver without guidance.
      stream_evaluations, sample_evaluations: per-sample network evaluations (a batch
        of ``b`` counts ``b``): ``N (M + N - 1)`` and ``N M``.
    """

    outputs: int
    stream_seconds: float
    sample_seconds: float
    stream_calls: int
    sample_calls: int
    stream_evaluations: int
    sample_evaluations: int

    @property
    def stream_outputs_per_second(self) -> float:
        return self.outputs / self.stream_seconds

    @property
    def sample_outputs_per_second(self) -> float:
        return self.outputs / self.sample_seconds

    @property
    def stream_outputs_per_call(self) -> float:
        return self.outputs / self.stream_calls

    @property
    def sample_outputs_per_call(self) -> float:
        return self.outputs / self.sample_calls

    def table(self) -> str:
        """The measurement as a small Markdown table."""
        rows = [
            (
                "stream",
                self.stream_seconds,
                self.stream_outputs_per_second,
                self.stream_calls,
                self.stream_outputs_per_call,
            ),
            (
                "sample",
                self.sample_seconds,
                self.sample_outputs_per_second,
                self.sample_calls,
                self.sample_outputs_per_call,
            ),
        ]
        lines = ["| method | seconds | outputs/s | batched calls | outputs/call |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {s:.4f} | {r:.1f} | {c} | {o:.3f} |" for n, s, r, c, o in rows]
        return "\n".join(lines)


def _best_time(fn, repeats):
    jax.block_until_ready(fn())  # compile (and warm)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return float(best)


def stream_throughput(solver, denoiser, x_T, grid=None, *, cond=None, nfe=None, repeats: int = 3) -> StreamThroughput:
    """Measure :func:`stream` against :func:`jdiff.sample` on the same ``M`` inputs:
    wall time (best of ``repeats`` after a compiling run), batched network calls and
    per-sample evaluations, for the throughput per output (outputs per second and per
    network call). For the benchmark (``benchmarks/accelerate.py``).

    Args:
      solver, denoiser, x_T, grid, cond, nfe: as in :func:`stream`.
      repeats: timed runs of each (the best is kept).

    Returns:
      A :class:`StreamThroughput` (``.table()`` formats it).

    Raises:
      ValueError: ``repeats < 1`` and what :func:`stream` refuses.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    _, info = stream(solver, denoiser, x_T, grid, cond=cond, nfe=nfe, return_info=True)
    g = info.grid
    t_stream = _best_time(lambda: stream(solver, denoiser, x_T, g, cond=cond), repeats)
    t_sample = _best_time(lambda: sample(solver, denoiser, x_T, g, cond=cond), repeats)
    M, N = int(jnp.shape(x_T)[0]), info.slots
    return StreamThroughput(M, t_stream, t_sample, info.ticks, N, N * info.ticks, N * M)
