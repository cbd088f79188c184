"""``jdiff sample --model PATH``: sample a diffusers-format model
(:func:`jdiff.interop.sample_model`). The options shared with ``--run`` keep their
meaning (``--grid-kind`` default: the scheduler's timesteps); the run-only ones
(``--ema``, ``--step``) are refused."""

from __future__ import annotations

import dataclasses
import os
import re

from jdiff._grid import GRID_KINDS
from jdiff.cli._args import check_output
from jdiff.cli._common import CLIError, positive

_RUN_ONLY = {"ema": "--ema/--no-ema", "step": "--step"}


@dataclasses.dataclass(frozen=True)
class ModelRequest:
    """The checked options of ``jdiff sample --model``."""

    path: str
    solver: str | None
    order: int
    nfe: int | None
    num: int
    seed: int
    guidance: float
    label: int | None
    batch_size: int
    grid_kind: str
    out: str


def _default_out(args) -> str:
    name = re.sub(r"[^\w.-]+", "_", os.path.basename(os.path.normpath(args.model))) or "model"
    parts = [name, args.solver or "default"] + ([f"o{args.order}"] if args.order else [])
    parts += [f"nfe{args.nfe}" if args.nfe else "nfe-default"] + ([args.grid_kind] if args.grid_kind else [])
    parts += [f"n{args.num or 16}", f"seed{args.seed or 0}"]
    parts += [f"label{args.label}"] if args.label is not None else []
    parts += [f"w{args.guidance:g}"] if args.guidance not in (None, 1.0) else []
    return os.path.join("samples", "_".join(parts) + ".png")


def resolve(args, outputs) -> ModelRequest:
    """Check the options and output paths; creates nothing. ``outputs(out)`` gives the
    image and ``.npz`` paths of ``--out`` (checked)."""
    if args.run is not None:
        raise CLIError("give --run DIR or --model PATH, not both")
    for key, flag in _RUN_ONLY.items():
        if getattr(args, key) is not None:
            raise CLIError(f"{flag} applies to --run; a --model folder has no run settings")
    positive(args.nfe, "--nfe")
    positive(args.num, "--num")
    positive(args.batch_size, "--batch-size", 0)
    positive(args.order, "--order", 0)
    positive(args.seed, "--seed", 0)
    if args.grid_kind not in (None, "default", *GRID_KINDS):
        raise CLIError(f"unknown --grid-kind {args.grid_kind!r}; valid kinds: default, {', '.join(GRID_KINDS)}")
    if args.order and not args.solver:
        raise CLIError("--order needs --solver (the model's default solver has its own order)")
    out = args.out or _default_out(args)
    for path in outputs(out):
        check_output(path, "--out", force=args.force)
    if not os.path.isdir(args.model) and not re.match(r"^[\w.-]+/[\w.-]+$", args.model):
        raise CLIError(f"--model {args.model}: no such folder (give a diffusers folder or a model id owner/name)")
    return ModelRequest(
        path=args.model,
        solver=args.solver,
        order=args.order or 0,
        nfe=args.nfe,
        num=args.num or 16,
        seed=args.seed or 0,
        guidance=1.0 if args.guidance is None else args.guidance,
        label=args.label,
        batch_size=args.batch_size,
        grid_kind=args.grid_kind or "default",
        out=out,
    )


def run(r: ModelRequest) -> int:
    from jdiff.interop import sample_model  # JAX is imported after the options are checked

    s = sample_model(
        r.path,
        solver=r.solver,
        order=r.order,
        nfe=r.nfe,
        num=r.num,
        seed=r.seed,
        guidance=r.guidance,
        class_label=r.label,
        batch_size=r.batch_size,
        grid_kind=r.grid_kind,
        out=r.out,
    )
    guided = f", guidance {s.guidance:g}" if s.labels is not None else ""
    took = f"in {s.seconds:.1f} s -> {s.image_path}, {s.npz_path}"
    print(f"{r.num} samples of {r.path} with {s.solver}, nfe {s.nfe}{guided} {took}")
    return 0
