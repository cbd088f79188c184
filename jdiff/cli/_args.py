"""Argument types and output checks shared by the commands.

The types refuse a value at parse time (``argparse``: ``jdiff COMMAND: error: argument
--X: ...``, exit status 2); :func:`check_output` raises ``ValueError`` before a command
does any work, which :func:`jdiff.cli.main` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os

__all__ = ["finite_float", "positive_float", "check_output"]


def finite_float(text: str) -> float:
    """``argparse`` type: a finite number (``nan``, ``inf`` refused)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """``argparse`` type: a finite number > 0."""
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def check_output(path: str, what: str = "--out", *, force: bool = False) -> str:
    """Check that a command can write the file ``path``, creating nothing.

    Refused (``ValueError`` naming ``what`` and the path): an empty name; a directory
    (existing, or a name ending in a separator); an existing file unless ``force`` (then
    it must be writable); a name whose nearest existing folder is a file or is not
    writable (the missing folders are created when the file is written).

    Returns:
      ``path`` unchanged.
    """
    if not path or not path.strip():
        raise ValueError(f"{what} must name a file, got {path!r}")
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory: give a file name")
    p = os.path.abspath(path)
    if os.path.lexists(p):
        if not force:
            raise ValueError(f"{what} {path} exists: give --force to overwrite it, or another name")
        if not os.access(p, os.W_OK):
            raise ValueError(f"{what} {path} exists and is not writable")
        return path
    folder = os.path.dirname(p)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path} cannot be created: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be created: {folder} is not writable")
    return path
