"""``jdiff prefer``: preference and reward fine-tuning of the shipped digits model
(:mod:`jdiff.preference._experiment`)."""

from __future__ import annotations

from jdiff.cli._args import check_output
from jdiff.cli._common import CLIError

HELP = "fine-tune the shipped digits model with preference / reward methods and compare them"


def add_parser(sub, formatter):
    from jdiff.preference._experiment import build_parser

    p = sub.add_parser(
        "prefer",
        formatter_class=formatter,
        help=HELP,
        description=(
            "Fine-tune the shipped class-conditional digits U-Net with each preference or reward method "
            "(Diffusion-DPO with LoRA, MaPO, KTO, D3PO, SPO, DDPO, DRaFT-1, DRaFT-LV, Adjoint) and report "
            "mean reward before/after, win rate against the base model, FD-digits and wall time."
        ),
    )
    build_parser(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(fn=run, check=resolve)
    return p


def resolve(args):
    """The methods to run, after checking every option and the output path (before
    the minutes of fine-tuning)."""
    from jdiff.preference._experiment import check_args

    try:
        methods = check_args(args)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.out is not None:
        check_output(args.out, "--out", force=args.force)
    return methods


def run(args, resolved) -> int:
    from jdiff.preference._experiment import run_all

    run_all(args, resolved)
    return 0
