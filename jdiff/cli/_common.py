"""Shared pieces of the commands: the user-error type, the compilation cache, option
checks. Building a run, its solver and its denoiser is the library's (:mod:`jdiff.runs`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from jdiff.runs import RunError, writable_path

__all__ = ["CLIError", "enable_compilation_cache", "positive", "sequence", "writable_path"]


class CLIError(RunError):
    """An error in the user's request: printed as one line, exit status 2
    (``multiline=True``: a first line, then one indented line per item). A
    :class:`jdiff.runs.RunError`, so the command line handles both alike."""


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache in ``$JDIFF_CACHE_DIR`` (default
    ``~/.cache/jdiff/jax``; ``JDIFF_CACHE_DIR=off`` disables it), caching every program
    (no minimum compile time or size), so a second run of a command does not compile
    again. Returns the directory (None when disabled)."""
    import jax

    path = os.environ.get("JDIFF_CACHE_DIR")
    if path is not None and path.strip().lower() in ("", "off", "0", "none"):
        return None
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "jdiff", "jax")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax.config.jax_compilation_cache_dir


def positive(v: int | None, name: str, minimum: int = 1) -> None:
    if v is not None and v < minimum:
        raise CLIError(f"{name} must be >= {minimum}, got {v}")


def sequence(x) -> Sequence:
    return list(x or [])
