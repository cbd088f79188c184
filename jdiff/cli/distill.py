"""``jdiff distill``: train a few-step student of a teacher with a method of
:data:`jdiff.distill.METHODS` and ship it as a folder: :func:`jdiff.distill.distill_run`."""

from __future__ import annotations

import os

from jdiff.cli._args import finite_float, positive_float
from jdiff.cli._common import CLIError, positive, writable_path

HELP = "train a few-step student of a teacher (distillation) and ship it as a folder"


def _describe(name, recipe) -> str:
    from jdiff.distill import recipe_options

    opts = ", ".join(f"{k}={v!r}" for k, v in recipe_options(recipe).items() if not k.startswith("_"))
    return f"  {name}: {getattr(recipe, 'paper', '') or ''}" + (f"\n    options: {opts}" if opts else "")


def add_parser(sub, formatter, methods: dict):
    listed = "\n".join(_describe(name, r) for name, r in sorted(methods.items()))
    p = sub.add_parser(
        "distill",
        formatter_class=formatter,
        help=HELP,
        description="Train a student of --teacher with --method on the teacher's training data, then write the "
        "student folder into --out: params.npz, student.json (method, options, step count, the teacher's "
        "configuration and process), metrics.jsonl, loss.png and TRAINED.md (command, machine, wall time). "
        "A folder of the same distillation is continued exactly from its newest checkpoint (--steps may be "
        "raised); SIGTERM or Ctrl-C saves a checkpoint and exits with status 0. Sample the student with "
        "'jdiff sample --student DIR'.",
        epilog="examples:\n  jdiff distill --method NAME --teacher digits --out students/NAME --steps 1000\n"
        "  jdiff distill --method NAME --teacher runs/digits --out students/x --set KEY=VALUE --lr 2e-4\n"
        "  jdiff sample --student students/NAME --steps 1\n"
        f"methods (jdiff.distill.METHODS):\n{listed or '  (none registered)'}",
    )
    p.add_argument("--method", required=True, choices=sorted(methods), metavar="NAME", help="the method (see below)")
    p.add_argument(
        "--teacher",
        required=True,
        metavar="RUN_OR_MODEL",
        help="a shipped model (digits), a model folder (jdiff.runs.export_pretrained) or a 'jdiff train' run",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the student folder (continued if it holds this one)")
    p.add_argument("--steps", type=int, default=1000, metavar="N", help="training steps in total")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a method option, read by the type of its default (a comma list for a tuple); a student folder "
        "as the value stands for its parameters (the next round of a chain); repeatable",
    )
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="training batch")
    p.add_argument("--lr", type=positive_float, default=2e-4, metavar="LR", help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="linear learning-rate warmup")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="learning-rate schedule")
    p.add_argument("--final-lr", type=finite_float, default=0.0, metavar="LR", help="cosine: the last step's rate")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the data order and the loss's noise")
    p.add_argument(
        "--ema-decay", type=finite_float, metavar="D", help="ship an EMA of the student's weights (default: none)"
    )
    p.add_argument(
        "--stop-at", type=int, metavar="STEP", help="save a checkpoint and stop after this step (continue later)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=run, check=resolve)
    return p


def resolve(args) -> dict:
    """The method's options, every value and path checked; creates nothing."""
    from jdiff.distill import parse_options
    from jdiff.runs import PRETRAINED

    positive(args.steps, "--steps")
    positive(args.batch_size, "--batch-size")
    positive(args.warmup_steps, "--warmup-steps", 0)
    positive(args.seed, "--seed", 0)
    positive(args.stop_at, "--stop-at")
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise CLIError(f"--ema-decay must be in (0, 1), got {args.ema_decay:g}")
    options = parse_options(args.method, list(args.set or []))
    if args.teacher not in PRETRAINED and not os.path.isdir(args.teacher):
        raise CLIError(f"--teacher {args.teacher}: not a shipped model ({', '.join(PRETRAINED)}) and no such folder")
    writable_path(args.out, "--out", directory=True)
    return options


def run(args, options: dict) -> int:
    from jdiff.distill import distill_run

    o = distill_run(
        args.method,
        args.teacher,
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        options=options,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        final_lr=args.final_lr,
        ema_decay=args.ema_decay,
        stop_at=args.stop_at,
        progress=not args.no_progress,
        argv=getattr(args, "argv", None),
    )
    if o.nothing_to_do is not None:
        print(f"nothing to do: {o.out} is at step {o.step}, and {o.nothing_to_do}; student {o.student}", flush=True)
    elif o.finished:
        print(
            f"done: step {o.step}/{o.total_steps}, loss {o.loss:.5g}, wall time {o.wall_time:.1f} s; "
            f"student {o.student} (sample with: jdiff sample --student {o.student})",
            flush=True,
        )
    else:
        print(
            f"stopped at step {o.step}/{o.total_steps} ({o.stopped}); checkpoint saved in {o.out}; "
            "continue with the same command",
            flush=True,
        )
    return 0


__all__ = ["add_parser", "resolve", "run"]
