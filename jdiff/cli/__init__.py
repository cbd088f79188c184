"""The ``jdiff`` command line: a thin layer of commands over library functions.

::

    jdiff train digits --out runs/digits                     # train (resumes if runs/digits has checkpoints)
    jdiff train --preset toy2d --set optim.lr=1e-3 --steps 500
    jdiff train --out runs/digits --resume --steps 3000      # continue a run with its saved config
    jdiff sample --run runs/digits --solver unipc3 --nfe 10 --guidance 2
    jdiff sample --model DiT-XL-2-256 --solver dpm++2m --nfe 10 --guidance 4   # a diffusers folder
    jdiff presets [NAME] [--keys]                            # list presets / show a config / list keys
    jdiff plot --run runs/digits                             # redraw the loss curve
    jdiff prefer --methods dpo,draft1                        # preference / reward fine-tuning of digits
    jdiff tune --solver unipc2 --nfe 5,6 --out grids.json    # optimized time grids (jdiff.tune)
    jdiff distill --method NAME --teacher digits --out DIR   # a few-step student (jdiff.distill)
    jdiff sample --student DIR --steps 2                     # draw from a student

One module per command (:mod:`~jdiff.cli.train`, :mod:`~jdiff.cli.sample`,
:mod:`~jdiff.cli.presets`, :mod:`~jdiff.cli.plot`); the configuration is the library's
own dataclasses (:mod:`jdiff.runs`), the run directory is handled in
:mod:`jdiff.runs`, sampling is :func:`jdiff.generate`, plots are
:mod:`jdiff.plotting`.

Every command first checks all its options, settings and output paths (``check``),
creating nothing and starting no JAX backend. Every failure is one line on stderr,
``jdiff COMMAND: error: MESSAGE`` (see :mod:`jdiff.cli._errors`): exit status 2 for an
error in what the user asked for (a ``ValueError``, including a check that failed
inside a compiled program), 1 for an I/O failure (``OSError``) or anything unexpected,
130 for Ctrl-C. ``--debug`` (accepted by every command) or ``JDIFF_DEBUG=1`` prints the
traceback first.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jdiff._xla import prefer_cpu_devices, prefer_fast_cpu_compile
from jdiff.cli import _errors
from jdiff.cli._common import CLIError, enable_compilation_cache
from jdiff.runs import ConfigError, Run, RunConfig, build_run, load_run, load_run_state

__all__ = [
    "main",
    "console_main",
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
    from jdiff.cli import bench, distill, plot, prefer, presets, sample, train, tune
    from jdiff.distill import METHODS

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
    distill.add_parser(sub, _Formatter, METHODS)
    debug = "print the full traceback of a failure (also JDIFF_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug)
    for command in sub.choices.values():  # SUPPRESS: the subcommand's default must not reset the global flag
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jdiff`` command; returns the exit status.

    Every failure is one line on stderr, ``jdiff COMMAND: error: MESSAGE``, and an exit
    status (:mod:`jdiff.cli._errors`): 2 for usage errors and for errors in the user's
    input (``ValueError`` and its subclasses, :class:`CLIError`, a corrupt or mismatched
    checkpoint), 1 for ``OSError`` and anything unexpected, 130 for Ctrl-C. ``--debug``
    or ``JDIFF_DEBUG=1`` prints the full traceback first (same exit status)."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    prefer_fast_cpu_compile()  # before JAX's backend starts
    command = next((a for a in argv if not a.startswith("-")), "jdiff")
    debug = _errors.debug_requested(argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = ["jdiff", *argv]  # recorded in a run's history
        if args.command == "bench":
            prefer_cpu_devices()  # one CPU device per core: generation shards over them
    except _UsageError as e:
        print(str(e), file=sys.stderr, flush=True)
        return 2
    # jdiff.train imports JAX: not before the arguments are parsed (--help stays fast)
    from jdiff.train._checkpoint import CheckpointCorruptError, NoUsableCheckpointError

    # ValueError covers ConfigError and CheckpointMismatchError; CLIError is named in
    # case it is not a ValueError; a corrupt checkpoint is the user's data.
    user_errors = (ValueError, CLIError, CheckpointCorruptError)
    with _errors.quiet_libraries(debug):
        try:
            resolved = args.check(args)  # every check before anything is created
            if args.command in ("train", "sample", "bench", "tune", "distill"):
                enable_compilation_cache()
            return int(args.fn(args, resolved) or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if isinstance(e, NoUsableCheckpointError):  # one line per rejected step
                e.multiline = True
            return _errors.report(command, e, debug=debug, user_errors=user_errors)


def console_main() -> int:
    """The ``jdiff`` program (and ``python -m jdiff``): :func:`main`, then, after a
    failure that has been reported in its one line, stderr closed for the interpreter's
    shutdown, where library threads can still print (an abandoned asynchronous
    checkpoint save after a full disk). ``--debug``/``JDIFF_DEBUG`` keep it open."""
    code = main()
    if code and not _errors.debug_requested(sys.argv[1:]):
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    return code


if __name__ == "__main__":
    sys.exit(console_main())
