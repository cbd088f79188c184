"""Orbax checkpointing with exact resume, corruption fallback and SIGTERM handling.

A checkpoint step directory written by :class:`Checkpointer` holds two orbax items:

- ``state``: the :class:`~jdiff.train.TrainState` pytree (params, optimizer state, EMA,
  step, RNG key data) through ``StandardSave``;
- ``meta``: a small JSON document with the user's ``extra`` dict (e.g. the data
  iterator position ``{"epoch": e, "step": s}``), the list of state leaves (path,
  shape, dtype) and a 64-bit checksum per leaf.

Orbax writes every step into a temporary directory and renames it when complete, so a
process killed mid-save leaves no half-written step behind. What orbax cannot see is a
finished step whose files were later truncated or altered (a full disk, a bad copy, bit
rot). :meth:`Checkpointer.restore` therefore walks the steps from newest to oldest
and takes the first one that (1) reads back without error and (2) matches the
checksums recorded at save time. A step that fails either test is reported in one
line (through ``report``, by default the ``jdiff.train.checkpoint`` logger) and the
previous step is used; a writing checkpointer also moves the bad step aside to
``corrupt_step_<n>`` (so training can save that step number again). If steps exist but
none is usable, :class:`NoUsableCheckpointError` lists every step and why it was
rejected, and nothing is moved. A ``read_only`` checkpointer never creates, renames or
deletes anything in the directory (for commands that only read a run).

The checksum of a leaf is ``(sum_i w_i u_i, sum_i w'_i u_i) mod 2^32`` over its bits
``u_i`` viewed as uint32 words, with odd position weights ``w_i, w'_i``. It is
computed on the devices with integer arithmetic, which is associative, so it is exact
and identical for any sharding and any number of hosts, and a change of any single
word always changes it.

A checkpoint of a different model (other parameter paths, shapes or dtypes) raises
:class:`CheckpointMismatchError` naming the differences, instead of restoring garbage
or failing deep inside orbax.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jdiff.train._checkpoint_errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointWriteError,
    NoUsableCheckpointError,
    _hold_orbax_errors,
    _logger,
    _one_line,
    _quiet_orbax,
    _write_error,
)
from jdiff.train._parallel import is_main_process, sync_flag

__all__ = [
    "Checkpointer",
    "CheckpointWriteError",
    "Restored",
    "CheckpointMismatchError",
    "CheckpointCorruptError",
    "NoUsableCheckpointError",
    "tree_checksum",
    "tree_description",
    "SigtermFlag",
]

_FORMAT = "jdiff.train.checkpoint/1"


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore` returns."""

    state: Any
    extra: dict
    step: int


# ---------------------------------------------------------------------- tree tools


def tree_description(tree) -> list:
    """``[[path, shape, dtype], ...]`` for every leaf, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [[jax.tree_util.keystr(p), [int(d) for d in np.shape(x)], str(jnp.result_type(x))] for p, x in flat]


def _words(x):
    """The bits of ``x`` as a flat uint32 vector."""
    dt = jnp.result_type(x)
    if dt == jnp.bool_ or jnp.dtype(dt).itemsize == 1:
        return x.astype(jnp.uint32).reshape(-1)
    size = jnp.dtype(dt).itemsize
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)


def _leaf_sums(u, i):
    w1 = (i * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
    w2 = (i * jnp.uint32(0x85EBCA6B) + jnp.uint32(0xC2B2AE35)) | jnp.uint32(1)
    return u * w1, u * w2


@jax.jit
def _checksums(leaves, sizes):
    """Checksums of a group of leaves in one small program: their words are
    concatenated and summed per leaf with a segment sum, instead of one reduction per
    leaf (which for a U-Net's ~600 leaves took ~25 s to trace and compile, stalling the
    first checkpoint). Integer sums mod 2^32 do not depend on the order, so the values
    are those of the per-leaf definition.

    ``sizes`` (the leaves' word counts) is passed as a runtime array: as a constant,
    XLA would constant-fold the per-word segment ids, which is far slower than
    computing them."""
    words = [_words(x) for x in leaves]
    n, k = sum(int(w.shape[0]) for w in words), len(words)
    u = jnp.concatenate(words) if k > 1 else words[0]
    seg = jnp.repeat(jnp.arange(k, dtype=jnp.int32), sizes, total_repeat_length=n)
    starts = (jnp.cumsum(sizes) - sizes).astype(jnp.uint32)
    i = jnp.arange(n, dtype=jnp.uint32) - starts[seg]
    a, b = _leaf_sums(u, i)
    s1 = jax.ops.segment_sum(a, seg, num_segments=k, indices_are_sorted=True)
    s2 = jax.ops.segment_sum(b, seg, num_segments=k, indices_are_sorted=True)
    return jnp.stack([s1, s2], axis=1).astype(jnp.uint32)


_GROUP_WORDS = 1 << 26  # bound the concatenated copy (256 MiB of uint32) per program


def tree_checksum(tree) -> list:
    """Per-leaf 64-bit checksums (``[[a, b], ...]`` of Python ints) of a pytree of
    arrays; exact and independent of sharding (see the module docstring)."""
    leaves = [jnp.asarray(x) if not isinstance(x, jax.Array) else x for x in jax.tree.leaves(tree)]
    out, group, sizes = [], [], []

    def flush():
        out.append(_checksums(group, np.asarray(sizes, np.int32)))

    for x in leaves:
        n = int(np.prod(np.shape(x), dtype=np.int64)) * max(1, jnp.dtype(x.dtype).itemsize // 4)  # uint32 words
        if group and sum(sizes) + n > _GROUP_WORDS:
            flush()
            group, sizes = [], []
        group.append(x)
        sizes.append(n)
    if group:
        flush()
    if not out:
        return []
    return np.concatenate([np.asarray(o) for o in out]).astype(np.int64).tolist()


def _compare(saved: list, target: list) -> list[str]:
    """Human-readable differences between two tree descriptions."""
    s = {p: (tuple(sh), dt) for p, sh, dt in saved}
    t = {p: (tuple(sh), dt) for p, sh, dt in target}
    msgs = []
    missing = [p for p in t if p not in s]
    extra = [p for p in s if p not in t]
    if missing:
        msgs.append(
            f"{len(missing)} leaves of the model are not in the checkpoint: "
            + ", ".join(missing[:8])
            + (" ..." if len(missing) > 8 else "")
        )
    if extra:
        msgs.append(
            f"{len(extra)} leaves of the checkpoint are not in the model: "
            + ", ".join(extra[:8])
            + (" ..." if len(extra) > 8 else "")
        )
    diff = [
        f"{p}: checkpoint {s[p][1]}{list(s[p][0])} vs model {t[p][1]}{list(t[p][0])}"
        for p in t
        if p in s and s[p] != t[p]
    ]
    if diff:
        msgs.append(
            f"{len(diff)} leaves differ in shape or dtype: " + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
        )
    if not msgs and [p for p, *_ in saved] != [p for p, *_ in target]:
        msgs.append("the leaves are the same but in a different tree order")
    return msgs


# --------------------------------------------------------------------- checkpointer


def _builtin(x):
    """JSON fallback for numpy/JAX scalars and small arrays in ``extra``."""
    if isinstance(x, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    raise TypeError(f"object of type {type(x).__name__} is not JSON serializable")


class Checkpointer:
    """Save every ``save_every`` steps, keep the last ``keep``, restore exactly.

    Built on ``orbax.checkpoint.CheckpointManager``. In a multi-host run every process
    constructs it with the same directory (a shared file system) and calls
    :meth:`save` and :meth:`restore` together: orbax writes each process's shards and
    the primary host commits the step.

    Arguments:
      directory: where step directories ``<dir>/<step>`` go (created if missing).
      save_every: save when ``step % save_every == 0`` (``save(force=True)`` always saves).
      keep: number of most recent steps to keep (``None``: all).
      async_save: let orbax write in a background thread after copying to host memory
        (call :meth:`wait` or :meth:`close` before exiting).
      verify: record and check the per-leaf checksums.
      read_only: only read: nothing in ``directory`` is ever created, renamed,
        quarantined or deleted (a missing directory is an empty one); :meth:`save`
        raises. For commands that must not change a run (sampling, inspection).
      report: ``report(line)`` receives one line per corrupt step skipped by
        :meth:`restore` (default: a warning of the ``jdiff.train.checkpoint`` logger).
    """

    def __init__(
        self,
        directory,
        *,
        save_every: int = 1000,
        keep: int | None = 3,
        async_save: bool = True,
        verify: bool = True,
        read_only: bool = False,
        report: Callable[[str], Any] | None = None,
    ):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = int(save_every)
        self.verify = verify
        self.read_only = bool(read_only)
        self._report = report if report is not None else _logger.warning
        self._mgr = None
        if self.read_only:
            if os.path.isdir(self.directory):
                options = ocp.CheckpointManagerOptions(
                    read_only=True,
                    create=False,
                    cleanup_tmp_directories=False,
                    save_interval_steps=0,
                    max_to_keep=None,
                    enable_async_checkpointing=False,
                )
                with _quiet_orbax():
                    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
            return
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._failed: CheckpointWriteError | None = None
        self._pending_step = None
        try:
            with _quiet_orbax():
                self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        except Exception as e:
            err = _write_error(e, self.directory, None)
            if err is None:
                raise
            raise err from None
        _hold_orbax_errors(True)
        self._holding = True

    # -------------------------------------------------------------------- info
    def all_steps(self) -> list[int]:
        return [] if self._mgr is None else sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return None if self._mgr is None else self._mgr.latest_step()

    # -------------------------------------------------------------------- save
    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(self, step: int, state, extra: dict | None = None, *, force: bool = False) -> bool:
        """Save ``state`` (and the JSON-serializable ``extra`` dict) as step ``step`` if
        it is a multiple of ``save_every`` or ``force``; returns whether it saved."""
        if self.read_only:
            raise RuntimeError(f"this Checkpointer of {self.directory} is read-only")
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        try:
            extra = json.loads(json.dumps({} if extra is None else dict(extra), default=_builtin))
        except TypeError as e:
            raise TypeError(f"extra must be JSON-serializable: {e}") from None
        meta = {
            "format": _FORMAT,
            "step": step,
            "leaves": tree_description(state),
            "extra": extra,
            "checksum": tree_checksum(state) if self.verify else None,
        }
        if self._failed is not None:
            raise self._failed
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        with self._writing(step):
            saved = bool(self._mgr.save(step, args=args, force=True))
        self._pending_step = step
        return saved

    @contextlib.contextmanager
    def _writing(self, step):
        """Turn an I/O failure of a (possibly background) save into one
        :class:`CheckpointWriteError`, raised once; later calls raise it again without
        touching orbax."""
        try:
            yield
        except Exception as e:
            err = _write_error(e, self.directory, step if step is not None else self._pending_step)
            if err is None:
                raise
            self._failed = err
            self._abandon()
            raise err from None

    def _abandon(self) -> None:
        """Close orbax's manager after a failed save (its errors are the one already
        raised). Its background threads may still report the failure later (a signal
        they wait for never comes), and coroutines of the save are left unawaited: the
        filter of orbax's error lines stays installed and Python's "never awaited"
        warnings are ignored for the rest of the process."""
        mgr, self._mgr = self._mgr, None
        if mgr is not None:
            with contextlib.suppress(Exception), _quiet_orbax():
                mgr.close()
        warnings.filterwarnings("ignore", message="coroutine '.*' was never awaited", category=RuntimeWarning)

    def _release_filter(self) -> None:
        if getattr(self, "_holding", False):
            self._holding = False
            _hold_orbax_errors(False)

    def wait(self) -> None:
        """Block until background saves are on disk (raises :class:`CheckpointWriteError`
        if one failed)."""
        if getattr(self, "_failed", None) is not None:
            raise self._failed
        if self._mgr is not None:
            with self._writing(None):
                self._mgr.wait_until_finished()

    def close(self) -> None:
        """Wait for background saves and release orbax's resources. Raises
        :class:`CheckpointWriteError` if a save failed and that was not raised yet."""
        if getattr(self, "_failed", None) is not None:
            self._abandon()
            return
        if self._mgr is not None:
            if self.read_only:
                self._mgr.wait_until_finished()
                self._mgr.close()
                return
            with self._writing(None):
                self._mgr.wait_until_finished()
            self._mgr.close()
        self._release_filter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------- restore
    def _read_meta(self, step: int) -> dict:
        meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT or "leaves" not in meta:
            raise CheckpointCorruptError("the meta item is not a jdiff checkpoint description")
        return meta

    def _restore_state(self, step: int, target, meta: dict):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        got = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
        leaves = jax.tree.leaves(got)
        treedef = jax.tree.structure(target)
        if len(leaves) != treedef.num_leaves:
            raise CheckpointCorruptError(f"restored {len(leaves)} leaves, expected {treedef.num_leaves}")
        state = jax.tree.unflatten(treedef, leaves)
        if self.verify and meta.get("checksum") is not None:
            have = tree_checksum(state)
            bad = [d[0] for d, a, b in zip(meta["leaves"], have, meta["checksum"]) if list(a) != list(b)]
            if bad:
                raise CheckpointCorruptError(f"checksum mismatch in {len(bad)} leaves: " + ", ".join(bad[:5]))
        return state

    def _quarantine(self, step: int) -> str | None:
        """Move a bad step aside (process 0); returns where it went."""
        src = os.path.join(self.directory, str(step))
        dst = None
        if is_main_process() and os.path.isdir(src):
            dst = os.path.join(self.directory, f"corrupt_step_{step}")
            n = 1
            while os.path.exists(dst):
                dst = os.path.join(self.directory, f"corrupt_step_{step}_{n}")
                n += 1
            try:
                os.rename(src, dst)
            except OSError:
                shutil.rmtree(src, ignore_errors=True)
                dst = None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jdiff_quarantine_{step}")
        return dst

    def _try(self, fn, *args):
        """``(value, None)`` or ``(None, reason)``; failures agreed across processes."""
        value = err = None
        try:
            with _quiet_orbax():
                value = fn(*args)
        except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
            err = e
        if sync_flag(err is not None):
            return None, _one_line(err) if err is not None else "unreadable on another process"
        return value, None

    def restore(self, target, *, step: int | None = None) -> Restored | None:
        """Restore the newest good step (or exactly ``step``) into the structure,
        shapes, dtypes and shardings of ``target`` (e.g. a freshly initialized state
        placed with :func:`replicate`).

        Returns a :class:`Restored` ``(state, extra, step)``, or ``None`` if the
        directory holds no checkpoint step at all. Corrupt steps newer than the one
        used are reported in one line each and, unless ``read_only``, moved aside (see
        the module docstring). If steps exist but none is usable it raises
        :class:`NoUsableCheckpointError` (listing each step and why) and changes
        nothing. With an explicit ``step`` corruption raises
        :class:`CheckpointCorruptError`. A checkpoint written for a different model
        raises :class:`CheckpointMismatchError`.
        """
        if self._mgr is None:
            if step is not None:
                raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}; have []")
            return None
        with _quiet_orbax():
            self._mgr.reload()
        have = self.all_steps()
        if step is not None and step not in have:
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}; have {have}")
        steps = [step] if step is not None else sorted(have, reverse=True)
        target_desc = tree_description(target)
        rejected: list[tuple[int, str]] = []
        found = None
        for s in steps:
            meta, why = self._try(self._read_meta, s)
            if why is None:
                diffs = _compare(meta["leaves"], target_desc)
                if diffs:
                    raise CheckpointMismatchError(
                        f"checkpoint step {s} in {self.directory} was written for a different model/optimizer "
                        f"configuration: " + " | ".join(diffs)
                    )
                state, why = self._try(self._restore_state, s, target, meta)
            if why is not None:
                if step is not None:
                    raise CheckpointCorruptError(f"checkpoint step {s} in {self.directory} is unusable: {why}")
                rejected.append((s, why))
                continue
            found = Restored(state=state, extra=meta.get("extra", {}), step=s)
            break
        if found is None:
            if rejected:
                raise NoUsableCheckpointError(self.directory, rejected)
            return None
        for s, why in rejected:
            where = None if self.read_only else self._quarantine(s)
            moved = f"; moved to {os.path.basename(where)}" if where else ""
            self._report(f"checkpoint step {s} in {self.directory} is corrupt ({why}); using step {found.step}{moved}")
        if rejected and not self.read_only:
            with _quiet_orbax():
                self._mgr.reload()
        return found


# --------------------------------------------------------------------- SIGTERM


class SigtermFlag:
    """A flag set by SIGTERM (and any other given signals), for the training loop to
    check between steps: save, then exit cleanly.

    Use as a context manager (installs the handler on entry, restores the previous
    one on exit). Only the main thread can install signal handlers; elsewhere the flag
    just never fires. A second SIGTERM while the flag is already set is ignored, so a
    save in progress is not interrupted.

    ``on_signal(signum, already_set)``, if given, is called first on every signal; it
    may print a message, or raise (e.g. ``KeyboardInterrupt`` on a second Ctrl-C) to
    abort at once instead of setting the flag.
    """

    def __init__(self, signals=(signal.SIGTERM,), on_signal=None):
        self._signals = tuple(signals)
        self._event = threading.Event()
        self._previous = {}
        self._on_signal = on_signal

    def _handler(self, signum, frame):
        if self._on_signal is not None:
            self._on_signal(signum, self._event.is_set())
        self._event.set()

    def install(self) -> SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __bool__(self) -> bool:
        return self.is_set()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
