"""``jdiff plot``: redraw a run's loss curve (see :mod:`jdiff.plotting`)."""

from __future__ import annotations

import os

from jdiff.cli._args import check_output
from jdiff.cli._common import CLIError
from jdiff.runs import rundir as R

HELP = "draw a run's loss curve"


def add_parser(sub, formatter):
    pl = sub.add_parser(
        "plot", formatter_class=formatter, help=HELP, description="Draw the loss curve of a run's metrics.jsonl."
    )
    pl.add_argument("--run", required=True, metavar="DIR", help="run directory")
    pl.add_argument("--out", metavar="FILE", help="output image, .png or .jpg (default: DIR/loss.png, redrawn)")
    pl.add_argument("--force", action="store_true", help="overwrite an existing --out")
    pl.set_defaults(fn=run, check=resolve)
    return pl


def resolve(args):
    from jdiff.plotting import image_format, read_metrics

    if not os.path.isdir(args.run):
        raise CLIError(f"run directory not found: {args.run}")
    if args.out is None:  # the run's own loss curve: redrawn
        out = check_output(os.path.join(args.run, R.LOSS_PLOT), "the default output", force=True)
    else:
        out = check_output(args.out, "--out", force=args.force)
    try:
        image_format(out)
    except ValueError as e:
        raise CLIError(f"--out {out}: {e}") from None
    path = os.path.join(args.run, R.METRICS_FILE)
    rows = [r for r in read_metrics(path) if "loss" in r]
    if not rows:
        raise CLIError(f"no metrics in {path}")
    return out, rows


def run(args, resolved) -> int:
    from jdiff import plotting

    out, rows = resolved
    name = os.path.basename(os.path.abspath(args.run))
    plotting.plot_loss([r["step"] for r in rows], [r["loss"] for r in rows], out, f"training loss: {name}")
    print(out)
    return 0
