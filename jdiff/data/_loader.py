"""A deterministic, resumable, multi-host batch iterator.

Position ``(epoch, step)`` names a *global* batch: rows ``step * B .. (step + 1) * B``
of epoch ``epoch``'s permutation of the ``N`` examples, ``B`` the global batch size.
The permutation depends only on ``(seed, epoch)``, so a global batch is the same set
of examples in the same order whatever the number of processes; process ``p`` of ``P``
gathers only its contiguous rows ``p * B/P .. (p + 1) * B/P`` of it (which is where
:func:`to_global` puts them when process ``p``'s devices hold the ``p``-th block of the
mesh's ``data`` axis), so with memory-mapped arrays each host reads only its part.
The whole iterator state is ``(epoch, step)``: saved in a checkpoint and restored, even
on a different number of processes, it continues with exactly the batches an
uninterrupted run would have produced.

The permutation is ``argsort`` of ``N`` raw 64-bit words from ``PCG64`` seeded with
``SeedSequence([seed, epoch])``. numpy guarantees both streams stable across versions
(NEP 19), unlike ``Generator.permutation``, so an old checkpoint resumes identically
after a numpy upgrade.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["Loader", "epoch_permutation", "to_global"]


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the ``n`` examples in epoch ``epoch``: a permutation of ``range(n)``
    (int64) that depends only on ``(seed, epoch, n)``."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    words = np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])).random_raw(n)
    return np.argsort(words, kind="stable")


def _leaves(arrays):
    return jax.tree.leaves(arrays)


class Loader:
    """Batches of a pytree of arrays, deterministic in ``(seed, epoch)`` and resumable.

    Arguments:
      arrays: a pytree (tuple, dict, single array; ``None`` entries such as missing
        labels are kept as ``None``) of arrays sharing the leading dimension ``N``. A
        leaf needs only ``.shape`` and integer-array indexing (numpy arrays,
        ``np.load(..., mmap_mode="r")`` memmaps, ...); it is never copied whole.
      global_batch_size: ``B``, summed over all processes.
      seed: non-negative int; fixes every epoch's order.
      process_index, process_count: this process ``p`` and the number ``P`` of
        processes; default ``jax.process_index()`` / ``jax.process_count()``. ``B`` must
        be divisible by ``P``; each process gets ``B / P`` rows per batch.
      drop_last: if True (training) an epoch has ``N // B`` batches and the remaining
        ``N % B`` examples of that epoch are skipped. If False (evaluation) it has
        ``ceil(N / B)``; the last batch is filled up to ``B`` by repeating examples from
        the start of the epoch's order, and :meth:`mask` marks which rows are real.
      shuffle: if False every epoch is in storage order (``seed`` is then unused).
      epochs: stop iterating at the start of this epoch (default: iterate forever).

    Iteration (``for batch in loader`` or ``next(loader)``) yields this process's part
    of the next global batch, a pytree like ``arrays``, and advances the position;
    :meth:`state` / :meth:`restore` save and reload it; :meth:`seek` jumps to a global
    step; :meth:`batch` reads any position without moving.
    """

    def __init__(
        self,
        arrays,
        global_batch_size: int,
        seed: int,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
        drop_last: bool = True,
        shuffle: bool = True,
        epochs: int | None = None,
    ):
        leaves = _leaves(arrays)
        if not leaves:
            raise ValueError("Loader: arrays holds no arrays")
        arrays = jax.tree.map(
            lambda a: a if hasattr(a, "shape") and hasattr(a, "__getitem__") else np.asarray(a), arrays
        )
        sizes = {tuple(np.shape(a))[:1] for a in _leaves(arrays)}
        if any(len(s) == 0 for s in sizes):
            raise ValueError("Loader: every array needs a leading example axis; got a scalar")
        if len(sizes) != 1:
            raise ValueError(f"Loader: arrays disagree on the number of examples: {sorted(s[0] for s in sizes)}")
        n = sizes.pop()[0]
        if process_count is None:
            process_count = jax.process_count()
        if process_index is None:
            process_index = jax.process_index()
        B, P, p = int(global_batch_size), int(process_count), int(process_index)
        if B < 1:
            raise ValueError(f"Loader: global_batch_size must be >= 1, got {global_batch_size}")
        if P < 1 or not 0 <= p < P:
            raise ValueError(f"Loader: need 0 <= process_index < process_count, got {p} and {P}")
        if B % P:
            raise ValueError(
                f"Loader: global_batch_size {B} is not divisible by process_count {P}; "
                "every process must get the same number of rows"
            )
        if int(seed) < 0:
            raise ValueError(f"Loader: seed must be a non-negative int, got {seed}")
        if n == 0:
            raise ValueError("Loader: the data set is empty")
        if drop_last and n < B:
            raise ValueError(f"Loader: {n} examples are fewer than one global batch of {B} (use drop_last=False)")
        if epochs is not None and int(epochs) < 0:
            raise ValueError(f"Loader: epochs must be >= 0, got {epochs}")
        self.arrays = arrays
        self.num_examples = n
        self.global_batch_size = B
        self.seed = int(seed)
        self.process_index, self.process_count = p, P
        self.local_batch_size = B // P
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.epochs = None if epochs is None else int(epochs)
        self.steps_per_epoch = n // B if drop_last else -(-n // B)
        self._epoch, self._step = 0, 0
        self._perm_epoch, self._perm = None, None

    # ------------------------------------------------------------------ positions
    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        if self._perm_epoch != epoch:  # one epoch cached: iteration is sequential
            self._perm, self._perm_epoch = epoch_permutation(self.seed, epoch, self.num_examples), epoch
        return self._perm

    def _split(self, global_step: int) -> tuple[int, int]:
        global_step = int(global_step)
        if global_step < 0:
            raise ValueError(f"global step must be >= 0, got {global_step}")
        return divmod(global_step, self.steps_per_epoch)

    def _positions(self, global_step: int) -> np.ndarray:
        """Rows of the epoch order that this process reads at ``global_step`` (may run
        past ``N`` in the padded last batch when ``drop_last=False``)."""
        _, step = self._split(global_step)
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        return np.arange(start, start + self.local_batch_size)

    def indices(self, global_step: int) -> np.ndarray:
        """Example indices (into ``arrays``) of this process's rows at ``global_step``."""
        epoch, _ = self._split(global_step)
        return self._order(epoch)[self._positions(global_step) % self.num_examples]

    def mask(self, global_step: int) -> np.ndarray:
        """Boolean ``(B / P,)``: which of this process's rows at ``global_step`` are real
        examples (all True except in the padded last batch of a ``drop_last=False``
        epoch)."""
        return self._positions(global_step) < self.num_examples

    def batch(self, global_step: int):
        """This process's rows of global batch ``global_step`` (counted from epoch 0,
        step 0), without moving the iterator."""
        idx = self.indices(global_step)
        return jax.tree.map(lambda a: a[idx], self.arrays)

    # ------------------------------------------------------------------ iteration
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        """Index, within the current epoch, of the next batch to be yielded."""
        return self._step

    @property
    def global_step(self) -> int:
        """Number of global batches yielded so far (since epoch 0, step 0)."""
        return self._epoch * self.steps_per_epoch + self._step

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self):
        if self.epochs is not None and self._epoch >= self.epochs:
            raise StopIteration
        out = self.batch(self.global_step)
        self.seek(self.global_step + 1)
        return out

    def seek(self, global_step: int) -> None:
        """Make the next batch global batch ``global_step``."""
        self._epoch, self._step = self._split(global_step)

    def state(self) -> dict[str, int]:
        """The position, a dict of ints for a checkpoint: ``epoch`` and ``step`` (the
        next batch), plus ``seed``, ``global_batch_size`` and ``num_examples`` so that
        :meth:`restore` can refuse a state from a differently configured loader.
        Process index and count are not part of it: a state resumes on any ``P``."""
        return {
            "epoch": self._epoch,
            "step": self._step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_examples": self.num_examples,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state` (values may be numpy/JAX scalars, as a
        checkpoint library returns them). Only ``epoch`` and ``step`` are required."""
        try:
            epoch, step = int(state["epoch"]), int(state["step"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"Loader.restore: state needs integer 'epoch' and 'step', got {state!r}") from e
        for k in ("seed", "global_batch_size", "num_examples"):
            if k in state and int(state[k]) != getattr(self, k):
                raise ValueError(
                    f"Loader.restore: state was saved with {k}={int(state[k])}, this loader has {k}={getattr(self, k)}"
                )
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(
                f"Loader.restore: need epoch >= 0 and 0 <= step < {self.steps_per_epoch}, got {epoch}, {step}"
            )
        self._epoch, self._step = epoch, step

    # The stateful-iterator protocol of :func:`jdiff.train.train`: a Loader passed as
    # ``data`` checkpoints its position and resumes without replaying batches.
    def get_state(self) -> dict[str, int]:
        """Alias of :meth:`state`."""
        return self.state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Alias of :meth:`restore`."""
        self.restore(state)

    def __repr__(self) -> str:
        return (
            f"Loader(N={self.num_examples}, global_batch_size={self.global_batch_size}, seed={self.seed}, "
            f"process={self.process_index}/{self.process_count}, epoch={self._epoch}, step={self._step})"
        )


def to_global(local_batch, sharding):
    """Assemble each process's local batch into global ``jax.Array`` s.

    ``sharding`` is the global batch's sharding, e.g.
    ``NamedSharding(mesh, PartitionSpec("data"))``; the global leading dimension is the
    sum of the processes' local ones. For the global rows to be in the loader's order,
    the mesh's ``data`` axis must list the devices process by process (as
    ``jax.make_mesh`` does).
    """
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
