"""The ``jdiff`` command line: a thin layer of commands over library functions.

::

    jdiff train digits --out runs/digits                     # train (resumes if runs/digits has checkpoints)
    jdiff train --preset toy2d --set optim.lr=1e-3 --steps 500
    jdiff train --out runs/digits --resume --steps 3000      # continue a run with its saved config
    jdiff sample --run runs/digits --solver unipc3 --nfe 10 --guidance 2
    jdiff presets [NAME] [--keys]                            # list presets / show a config / list keys
    jdiff plot --run runs/digits                             # redraw the loss curve
    jdiff prefer --methods dpo,draft1                        # preference / reward fine-tuning of digits
    jdiff tune --solver unipc2 --nfe 5,6 --out grids.json    # optimized time grids (jdiff.tune)

One module per command (:mod:`~jdiff.cli.train`, :mod:`~jdiff.cli.sample`,
:mod:`~jdiff.cli.presets`, :mod:`~jdiff.cli.plot`); the configuration is the library's
own dataclasses (:mod:`jdiff.runs`), the run directory is handled in
:mod:`jdiff.runs`, sampling is :func:`jdiff.generate`, plots are
:mod:`jdiff.plotting`.

Every command first checks all its options and settings (``check``), creating
nothing and starting no JAX backend; errors in what the user asked for are printed as
one line on stderr with exit status 2 (``JDIFF_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jdiff._xla import prefer_cpu_devices, prefer_fast_cpu_compile
from jdiff.cli._common import CLIError, enable_compilation_cache
from jdiff.runs import ConfigError, Run, RunConfig, RunError, RunIOError, build_run, load_run, load_run_state

__all__ = [
    "main",
    "build_parser",
    "CLIError",
    "ConfigError",
    "RunConfig",
    "Run",
    "build_run",
    "load_run",
    "load_run_state",
    "enable_compilation_cache",
]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (raised, so that :func:`main` returns 2)."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Show a default only where there is one worth showing."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if d in (None, False, argparse.SUPPRESS) or "default" in h or action.option_strings == []:
            return h
        return f"{h} (default: {d})"


def build_parser() -> argparse.ArgumentParser:
    from jdiff import presets as P
    from jdiff import solvers
    from jdiff.cli import bench, plot, prefer, presets, sample, train, tune

    parser = _Parser(
        prog="jdiff",
        formatter_class=_Formatter,
        description="Train and sample diffusion / flow models with jdiff.",
        epilog="Run 'jdiff COMMAND --help' for a command's options. Errors exit with status 2.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    train.add_parser(sub, _Formatter, P.preset_names())
    sample.add_parser(sub, _Formatter, solvers.names())
    presets.add_parser(sub, _Formatter)
    plot.add_parser(sub, _Formatter)
    bench.add_parser(sub, _Formatter, solvers.names())
    prefer.add_parser(sub, _Formatter)
    tune.add_parser(sub, _Formatter, solvers.names())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jdiff`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prefer_fast_cpu_compile()  # before JAX's backend starts
    command = argv[0] if argv and not argv[0].startswith("-") else "jdiff"
    debug = bool(os.environ.get("JDIFF_DEBUG"))
    try:
        args = build_parser().parse_args([str(a) for a in argv])
        args.argv = ["jdiff", *(str(a) for a in argv)]  # recorded in a run's history
        if args.command == "bench":
            prefer_cpu_devices()  # one CPU device per core: generation shards over them
    except _UsageError as e:
        print(str(e), file=sys.stderr, flush=True)
        return 2
    from jdiff.train._checkpoint import (
        CheckpointCorruptError,
        CheckpointMismatchError,
        CheckpointWriteError,
        NoUsableCheckpointError,
    )

    try:
        resolved = args.check(args)  # every check before anything is created
        if args.command in ("train", "sample", "bench", "tune"):
            enable_compilation_cache()
        return int(args.fn(args, resolved) or 0)
    except (RunError, CheckpointMismatchError, CheckpointCorruptError) as e:  # CLIError, ConfigError: RunErrors
        if debug:
            raise
        if getattr(e, "multiline", False) or isinstance(e, NoUsableCheckpointError):
            # a first line, then one line per item (differing setting, rejected step)
            msg = "\n".join(line.rstrip() for line in str(e).splitlines() if line.strip())
        else:
            msg = " ".join(str(e).split())  # one line
        print(f"jdiff {command}: error: {msg}", file=sys.stderr, flush=True)
        return 2
    except (RunIOError, CheckpointWriteError) as e:  # I/O failures of a run: one line, exit 1
        if debug:
            raise
        print(f"jdiff {command}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
