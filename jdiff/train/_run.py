"""A run's record on disk: its configuration, an append-only history, the metrics log.

A run directory holds, besides the checkpoints:

- ``config.json``: the run's configuration as a plain nested dict (e.g.
  ``jdiff.presets.config_to_dict`` output), written atomically (:func:`write_config`).
  Resuming needs it: a missing or unreadable file is a :class:`RunRecordError` unless
  the caller passes the full configuration explicitly (:func:`read_config`).
- ``history.jsonl``: one JSON object per line and per event of an invocation (argv,
  time, start and end step, what happened), only ever appended to
  (:func:`append_history`); earlier lines are never rewritten. The learning-rate plan
  of the run (its total step count and the changes of it, see
  :func:`jdiff.train.lr_schedule`'s ``extensions``) is derived from it
  (:func:`schedule_plan`).
- ``metrics.jsonl``: one JSON object per logged step. On resume, lines past the
  restored step are dropped (that work is redone), never lines the restored step has
  logged (:func:`trim_metrics`).

:func:`check_resume_config` says which settings may change when a run is resumed.
Everything here works on plain dicts and paths, independent of any CLI.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CONFIG_FILE",
    "HISTORY_FILE",
    "METRICS_FILE",
    "RESUMABLE_KEYS",
    "RunRecordError",
    "ResumeConfigError",
    "write_json_atomic",
    "write_config",
    "read_config",
    "flatten_config",
    "check_resume_config",
    "history_entry",
    "append_history",
    "read_history",
    "schedule_plan",
    "trim_metrics",
]

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"
METRICS_FILE = "metrics.jsonl"

# Dotted keys (fnmatch patterns) that may differ between the saved configuration and
# the one requested on resume: they change how long the run goes, what it logs, how
# often it checkpoints and how it samples, not what the next step computes (a changed
# train.steps continues the learning-rate schedule, see jdiff.train.lr_schedule).
RESUMABLE_KEYS = (
    "name",
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep",
    "train.grid_every",
    "train.async_checkpointing",
    "sample.*",
)


class RunRecordError(ValueError):
    """A run's record (config, history) is missing, unreadable or inconsistent."""


class ResumeConfigError(RunRecordError):
    """The configuration requested on resume changes settings a run cannot change.

    Attributes:
      forbidden: ``{dotted key: (saved value, requested value)}`` (a key absent on one
        side has the value :data:`MISSING`).
    """

    def __init__(self, message: str, forbidden: dict):
        super().__init__(message)
        self.forbidden = forbidden


class _Missing:
    def __repr__(self):
        return "<missing>"


MISSING = _Missing()


# ---------------------------------------------------------------------- files


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, flush it to disk and rename
    it over ``path``: a reader (or a crash) sees the old file or the new one."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(d)


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (temporary file, fsync,
    rename). Raises ``TypeError`` before touching the file if ``obj`` is not JSON."""
    text = json.dumps(obj, indent=2) + "\n"
    _replace_atomic(path, text)


# --------------------------------------------------------------------- config


def write_config(run_dir, config: Mapping) -> str:
    """Write the run's configuration (a plain nested dict) to ``run_dir/config.json``
    atomically; returns the path. ``run_dir`` must exist."""
    path = os.path.join(os.fspath(run_dir), CONFIG_FILE)
    write_json_atomic(path, dict(config))
    return path


def read_config(run_dir, *, replacement: Mapping | None = None) -> dict:
    """The saved configuration of the run in ``run_dir``.

    A missing or unreadable ``config.json`` raises :class:`RunRecordError` saying so,
    unless ``replacement`` is given: the caller then states that it passes the run's
    full configuration itself (e.g. a user re-entering every setting with an explicit
    flag), and ``replacement`` is returned. A readable file always wins over
    ``replacement`` (compare the two with :func:`check_resume_config`).
    """
    path = os.path.join(os.fspath(run_dir), CONFIG_FILE)
    try:
        with open(path) as f:
            cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError(f"it holds a JSON {type(cfg).__name__}, not an object")
        return cfg
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = f"is unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    if replacement is not None:
        return dict(replacement)
    raise RunRecordError(
        f"{path} {problem}: a run cannot be resumed without the configuration it was trained with; "
        "give its full configuration explicitly to resume anyway"
    )


def flatten_config(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of a nested dict; lists and tuples are leaves (as tuples)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def check_resume_config(
    saved: Mapping, requested: Mapping, *, allowed: Sequence[str] = RESUMABLE_KEYS
) -> dict[str, tuple]:
    """Compare the saved configuration of a run with the one requested on resume.

    Keys matching a pattern of ``allowed`` (default :data:`RESUMABLE_KEYS`: the step
    count, logging / checkpoint / grid intervals, checkpoints kept, ``sample.*``) may
    change; every other difference (model, objective, data, optimizer, EMA, batch size,
    seed, and keys present on one side only) raises :class:`ResumeConfigError` listing
    all of them, ``key: saved -> requested`` one per line. Returns the allowed changes
    ``{key: (saved, requested)}`` (empty if the two are equal).
    """
    a, b = flatten_config(saved), flatten_config(requested)
    changed = {
        k: (a.get(k, MISSING), b.get(k, MISSING))
        for k in sorted(set(a) | set(b))
        if a.get(k, MISSING) != b.get(k, MISSING)
    }
    ok = {k: v for k, v in changed.items() if any(fnmatch.fnmatchcase(k, p) for p in allowed)}
    bad = {k: v for k, v in changed.items() if k not in ok}
    if bad:
        lines = "".join(f"\n  {k}: {old!r} -> {new!r}" for k, (old, new) in bad.items())
        raise ResumeConfigError(
            f"resuming cannot change {len(bad)} setting(s) of the run (only {', '.join(allowed)} may change):{lines}",
            bad,
        )
    return ok


# -------------------------------------------------------------------- history


def history_entry(
    event: str,
    *,
    argv: Sequence[str] | None = None,
    start_step: int | None = None,
    end_step: int | None = None,
    total_steps: int | None = None,
    what: str | None = None,
    **fields,
) -> dict:
    """One history record: ``event`` (e.g. ``"started"``, ``"trained"``,
    ``"stopped"``, ``"schedule_extended"``), the command line, the steps, a human
    sentence ``what`` (e.g. ``"trained 1000->1500"``) and any JSON-serializable
    ``fields``; ``None`` values are left out. The time is added by
    :func:`append_history`."""
    entry: dict[str, Any] = {"event": str(event)}
    for k, v in (
        ("argv", None if argv is None else [str(a) for a in argv]),
        ("start_step", start_step),
        ("end_step", end_step),
        ("total_steps", total_steps),
        ("what", what),
    ):
        if v is not None:
            entry[k] = v
    entry.update({k: v for k, v in fields.items() if v is not None})
    return entry


def append_history(run_dir, entry: Mapping) -> dict:
    """Append ``entry`` (a dict, see :func:`history_entry`) as one line of
    ``run_dir/history.jsonl`` and flush it to disk; returns the entry as written, with
    ``time`` (local ISO 8601 with UTC offset) added unless given. Earlier lines are
    never rewritten; a line torn by a crash stays on its own line (and is skipped by
    :func:`read_history`)."""
    entry = dict(entry)
    entry.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    line = json.dumps(entry)  # raises before anything is written
    path = os.path.join(os.fspath(run_dir), HISTORY_FILE)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


def read_history(run_dir) -> list[dict]:
    """The entries of ``run_dir/history.jsonl`` in order (``[]`` if there is none);
    lines that do not decode (torn by a crash) are skipped."""
    path = os.path.join(os.fspath(run_dir), HISTORY_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in raw:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict):
            out.append(e)
    return out


def schedule_plan(history: Iterable[Mapping]) -> tuple[int | None, tuple[tuple[int, int], ...]]:
    """``(total_steps, extensions)`` for :func:`jdiff.train.lr_schedule` from a run's
    history: the total of the first ``"started"`` entry, and ``(start_step,
    total_steps)`` for each later ``"started"`` entry whose total differs from the one
    in force at its start step.

    A start at step ``a`` discards the recorded changes at steps ``>= a`` (they belong
    to training that was lost, e.g. to a checkpoint that failed to restore), so the
    plan is that of the run's surviving lineage and a resumed run recomputes exactly
    the learning rates it used before. Append the current invocation's ``"started"``
    entry first. ``(None, ())`` if no entry has started.
    """
    base: int | None = None
    ext: list[tuple[int, int]] = []
    for e in history:
        if e.get("event") != "started" or e.get("total_steps") is None or e.get("start_step") is None:
            continue
        a, n = int(e["start_step"]), int(e["total_steps"])
        if base is None:
            base = n
            continue
        ext = [x for x in ext if x[0] < a]
        in_force = ext[-1][1] if ext else base
        if n != in_force and n > a:
            ext.append((a, n))
    return base, tuple(ext)


# -------------------------------------------------------------------- metrics


def trim_metrics(path, restored_step: int | None) -> float:
    """Make ``metrics.jsonl`` agree with a run resumed at ``restored_step``: drop the
    lines of steps after it (that work is redone and logged again), keep every line of
    a step ``<= restored_step`` (and any line without a step) in order, and drop a
    last line torn by a crash. Rewritten atomically, and only if something changes;
    with ``restored_step=None`` (nothing restored) the file is never changed.

    Returns the ``wall_time`` of the last line kept (0.0 if none), so that a resumed
    run's wall clock continues.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read().decode(errors="replace")
    except FileNotFoundError:
        return 0.0
    lines = data.splitlines()
    torn_tail = bool(lines) and not data.endswith("\n")
    keep, last_wall = [], 0.0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if torn_tail and i == len(lines) - 1:
                continue  # an append cut short by a crash
            keep.append(line)  # not ours to judge: keep it
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if restored_step is not None and isinstance(step, (int, float)) and step > restored_step:
            continue
        keep.append(line)
        if isinstance(row, dict) and isinstance(row.get("wall_time"), (int, float)):
            last_wall = float(row["wall_time"])
    if restored_step is None:
        return last_wall
    text = "".join(line + "\n" for line in keep)
    if text != data:
        _replace_atomic(path, text)
    return last_wall
