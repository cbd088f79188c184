"""``jdiff sample``: sample a trained run with any solver of the registry, on every
device, through :func:`jdiff.generate`; or, with ``--model``, a diffusers-format folder
(:mod:`jdiff.cli._model`, :func:`jdiff.interop.sample_model`)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from jdiff.cli import _model, _student
from jdiff.cli._args import check_output, finite_float
from jdiff.cli._common import CLIError, positive
from jdiff.runs import ConfigError, check_solver_nfe, denoiser_apply, make_solver, run_denoiser, to_host
from jdiff.runs import rundir as R

HELP = "sample from a trained run, a diffusers-format model or a distilled student"


def add_parser(sub, formatter, solver_names: list[str]):
    sa = sub.add_parser(
        "sample",
        formatter_class=formatter,
        help=HELP,
        description="Load a run's config and newest checkpoint and sample with any jdiff solver. Writes an image "
        "(a grid, or a 2-D scatter plot; PNG, or JPEG for .jpg/.jpeg) and an .npz with the samples. Unset options "
        "default to the run's 'sample' config section. With --model, sample a diffusers-format folder (a pipeline "
        "with model_index.json, or a model folder with config.json) on its scheduler's grid, decoded by its VAE. "
        "With --student, draw from a student folder of 'jdiff distill' with its own method at --steps.",
        epilog="examples:\n  jdiff sample --run runs/digits --solver unipc3 --nfe 10 --guidance 2\n"
        "  jdiff sample --run runs/digits --solver dpm_solver_pp --order 3 --nfe 50 --label 3 --num 16\n"
        "  jdiff sample --model DiT-XL-2-256 --solver dpm++2m --nfe 10 --guidance 4 --class-label 207\n"
        "  jdiff sample --student students/digits-cd --steps 2 --num 100\n"
        f"solvers (jdiff.solvers.names(); factory names such as dpm_solver_pp take --order): {', '.join(solver_names)}",
    )
    sa.add_argument("--run", metavar="DIR", help="run directory written by 'jdiff train'")
    sa.add_argument(
        "--model",
        metavar="PATH",
        help="a diffusers-format folder (or a model id owner/name when huggingface_hub is installed); "
        "default solver and NFE: the scheduler's",
    )
    sa.add_argument(
        "--student", metavar="DIR", help="a student folder written by 'jdiff distill' (sampled by its own method)"
    )
    sa.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="--student: its step count (default: the steps it was trained for; more are refused)",
    )
    sa.add_argument("--solver", metavar="NAME", help="sampler from jdiff.solvers (default: the run's sample.solver)")
    sa.add_argument(
        "--order",
        type=int,
        metavar="K",
        help="solver order for factory names (dpm_solver, dpm_solver_pp, deis, ipndm, unipc, ...) "
        "(default: the solver's own; the run's sample.order if --solver is not given)",
    )
    sa.add_argument("--nfe", type=int, metavar="N", help="number of model evaluations (default: the run's sample.nfe)")
    sa.add_argument("--grid-kind", metavar="KIND", help="time grid (default: the run's sample.grid_kind)")
    sa.add_argument("--num", type=int, metavar="M", help="number of samples (default: the run's sample.num)")
    sa.add_argument("--seed", type=int, metavar="S", help="seed of the noise (default: the run's sample.seed)")
    g = sa.add_mutually_exclusive_group()
    g.add_argument("--ema", dest="ema", action="store_true", default=None, help="use the EMA parameters")
    g.add_argument("--no-ema", dest="ema", action="store_false", default=None, help="use the raw trained parameters")
    sa.add_argument(
        "--guidance",
        type=finite_float,
        metavar="W",
        help="classifier-free guidance scale, 1: conditional model alone, 0: unconditional "
        "(default: the run's sample.guidance)",
    )
    sa.add_argument(
        "--label", "--class-label", type=int, metavar="L", help="class of every sample (default: cycle through classes)"
    )
    sa.add_argument("--step", type=int, metavar="STEP", help="checkpoint step (default: the newest)")
    sa.add_argument("--batch-size", type=int, default=0, metavar="B", help="samples per call (0: all at once)")
    sa.add_argument(
        "--out",
        metavar="FILE",
        help="output image, .png or .jpg (no extension: .png; the .npz goes next to it; default: "
        "DIR/samples/sample_<solver>_nfe<N>[_<grid kind>]_step<S>_n<M>_seed<S>[_label<L>][_w<W>][_raw].png, "
        "a name for each setting that changes the samples)",
    )
    sa.add_argument("--force", action="store_true", help="overwrite an existing --out (and its .npz)")
    sa.set_defaults(fn=run, check=resolve)
    return sa


def _outputs(out: str) -> tuple[str, str]:
    """``(image path, npz path)`` of ``--out``."""
    from jdiff.plotting import image_format

    check_output(out, "--out", force=True)  # a file name, in a folder that can be written
    root, ext = os.path.splitext(out)
    img = out if ext else out + ".png"
    try:
        image_format(img)
    except ValueError as e:
        raise CLIError(f"--out {out}: {e}") from None
    return img, (root if ext else out) + ".npz"


def _tag(s, step: int, label: int | None, guidance: float) -> str:
    """The default output name: every setting that changes the samples (two commands
    that differ in any of them never write the same file)."""
    parts = [f"{s.solver}{f'-{s.order}' if s.order else ''}", f"nfe{s.nfe}"]
    parts += [s.grid_kind] if s.grid_kind != "default" else []
    parts += [f"step{step}", f"n{s.num}", f"seed{s.seed}"]
    parts += [f"label{label}"] if label is not None else []
    parts += [f"w{guidance:g}"] if guidance != 1.0 else []
    parts += [] if s.ema else ["raw"]
    return "_".join(parts)


def resolve(args):
    """Check the options, the output paths and the run's sampling settings; creates nothing."""
    if args.student is not None:
        return _student.resolve(args, _outputs)
    if args.steps is not None:
        raise CLIError("--steps applies to --student; a run or a model samples at --nfe")
    if args.model is not None:
        return _model.resolve(args, _outputs)
    if args.run is None:
        raise CLIError(
            "give --run DIR (a run of 'jdiff train'), --model PATH (a diffusers-format folder) "
            "or --student DIR (a folder of 'jdiff distill')"
        )

    positive(args.nfe, "--nfe")
    positive(args.num, "--num")
    positive(args.batch_size, "--batch-size", 0)
    positive(args.order, "--order", 0)
    positive(args.seed, "--seed", 0)
    positive(args.step, "--step", 0)
    if args.out is not None:
        for path in _outputs(args.out):
            check_output(path, "--out", force=args.force)
    if not os.path.isdir(args.run):
        raise CLIError(f"run directory not found: {args.run}")
    if args.out is None:  # the default name is known after the checkpoint is chosen
        check_output(os.path.join(args.run, R.SAMPLES_DIR, "sample.png"), "the default output", force=True)
    cfg = R.load_config_file(args.run)
    s = cfg.sample
    changes = {}
    if args.solver is not None:
        changes["solver"], changes["order"] = args.solver, args.order or 0
    elif args.order is not None:
        changes["order"] = args.order
    for name in ("nfe", "num", "seed", "ema", "guidance", "grid_kind"):
        v = getattr(args, name)
        if v is not None:
            changes[name] = v
    try:
        s = dataclasses.replace(s, **changes)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"sample: {e}") from None
    make_solver(s)
    if not R.checkpoint_steps(args.run):
        raise CLIError(f"no checkpoint found in {os.path.join(args.run, R.CKPT_DIR)}")
    return s


def run(args, s) -> int:
    if isinstance(s, _model.ModelRequest):
        return _model.run(s)
    if isinstance(s, _student.StudentRequest):
        return _student.run(s, _outputs)
    import numpy as np

    import jdiff

    solver = make_solver(s)
    cfg, info, run_, state, step = R.load_run_state(args.run, args.step)
    check_solver_nfe(run_, solver, s.nfe, s.grid_kind)
    nc = run_.num_classes
    guidance = s.guidance
    if nc == 0 and (args.label is not None or (args.guidance is not None and args.guidance != 1.0)):
        raise CLIError("this run's model is unconditional: --label and --guidance do not apply")
    if args.label is not None and not 0 <= args.label < nc:
        raise CLIError(f"--label must be in [0, {nc}), got {args.label}")
    if nc == 0:
        guidance = 1.0
    elif guidance != 1.0 and cfg.objective.label_dropout == 0:
        print(
            "warning: the model was trained without label dropout (objective.label_dropout=0), so its "
            "unconditional prediction is untrained; guidance != 1 will not help",
            file=sys.stderr,
        )
    labels = None
    if nc:
        labels = np.full(s.num, args.label, np.int32) if args.label is not None else np.arange(s.num) % nc
    if s.ema and state.ema_params is None:
        raise CLIError("this run has no EMA parameters (ema.decay=none): use --no-ema")
    params = to_host(state.ema_params if s.ema else state.params)
    den = run_denoiser(denoiser_apply(run_), run_, params, guidance)
    t0 = time.perf_counter()
    x, spent = jdiff.generate(
        solver,
        den,
        s.num,
        run_.data_shape,
        nfe=s.nfe,
        seed=s.seed,
        cond=None if labels is None else labels.astype(np.int32),
        batch_size=args.batch_size,
        grid_kind=s.grid_kind,
        return_nfe=True,
    )
    seconds = time.perf_counter() - t0
    if not np.all(np.isfinite(x)):
        print(f"warning: {int((~np.isfinite(x)).sum())} non-finite values in the samples", file=sys.stderr)

    from jdiff import plotting

    out = args.out or os.path.join(args.run, R.SAMPLES_DIR, f"sample_{_tag(s, step, args.label, guidance)}.png")
    img, npz = _outputs(out)
    reference = cfg.data.load()[0][:5000] if cfg.data.source == "toy" else None
    nrow = nc if (nc and args.label is None and s.num % nc == 0) else None
    title = f"{cfg.name} step {step}: {solver.name}, nfe {spent}" + (f", guidance {guidance:g}" if nc else "")
    plotting.save_samples(x, img, nrow=nrow, reference=reference, title=title)
    os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
    np.savez(
        npz,
        samples=x,
        labels=labels if labels is not None else np.zeros((0,), np.int32),
        solver=solver.name,
        nfe=spent,
        step=step,
        guidance=guidance,
        ema=s.ema,
        seed=s.seed,
    )
    print(
        f"{s.num} samples from step {step} ({'EMA' if s.ema else 'raw'} params) with {solver.name}, "
        f"nfe {spent}{f', guidance {guidance:g}' if nc else ''} in {seconds:.1f} s -> {img}, {npz}"
    )
    return 0
