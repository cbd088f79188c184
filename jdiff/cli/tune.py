"""``jdiff tune``: fit, evaluate and save optimized time grids for a model and a solver
(:func:`jdiff.tune.tune`), for the shipped digits model or a trained run."""

from __future__ import annotations

import math
import os

from jdiff import solvers as S
from jdiff import tune as T
from jdiff.cli._common import CLIError, positive
from jdiff.runs import denoiser_apply, load_run_state, lock_run, pretrained, run_denoiser, to_host, writable_path

HELP = "fit optimized time grids (LD3 / GITS / DMN) for a model, a solver and NFEs"


def add_parser(sub, formatter, solver_names: list[str]):
    t = sub.add_parser(
        "tune",
        formatter_class=formatter,
        help=HELP,
        description="Fit a time grid per NFE for one solver and one model (LD3: learned through the sampler; GITS: "
        "dynamic programming over a teacher trajectory; DMN: a bound minimized without model calls), evaluate it "
        "on held-out noises against a 200-step teacher next to the best fixed grid (kept instead when the fit does "
        "not beat it), and save the grids to a JSON file tied to the model (jdiff.tune.load_grid reads it back).",
        epilog="examples:\n  jdiff tune --solver unipc2 --nfe 5,6,8 --out digits_grids.json\n"
        "  jdiff tune --run runs/digits --solver dpm++2m --nfe 5 --method gits --out runs/digits/grids.json\n"
        f"solvers: {', '.join(solver_names)}",
    )
    t.add_argument("--run", metavar="DIR", help="run directory of 'jdiff train' (default: --pretrained)")
    t.add_argument("--step", type=int, metavar="STEP", help="checkpoint step of --run (default: the newest)")
    t.add_argument("--pretrained", default="digits", metavar="NAME", help="shipped model (without --run)")
    t.add_argument("--solver", required=True, metavar="NAME", help="a deterministic solver of jdiff.solvers")
    t.add_argument("--nfe", required=True, metavar="N,M,..", help="NFEs to fit")
    t.add_argument("--method", default="ld3", choices=("ld3", "gits", "dmn"), help="grid optimizer")
    t.add_argument("--num-train", type=int, default=100, metavar="N", help="training noises")
    t.add_argument("--num-val", type=int, default=100, metavar="N", help="held-out noises")
    t.add_argument("--iters", type=int, default=300, metavar="K", help="optimizer steps (ld3, dmn)")
    t.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed (held-out: S + 1)")
    t.add_argument("--guidance", type=float, default=1.0, metavar="W", help="classifier-free guidance scale")
    t.add_argument("--out", required=True, metavar="FILE", help="grid file (.json); grids for other NFEs are kept")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=run, check=resolve)
    return t


def resolve(args):
    """Check every option; creates nothing and starts no JAX backend."""

    try:
        nfes = sorted({int(v) for v in args.nfe.split(",") if v.strip()})
    except ValueError:
        raise CLIError(f"--nfe must be a comma-separated list of integers, got {args.nfe!r}") from None
    if not nfes or min(nfes) < 1:
        raise CLIError(f"--nfe must list positive integers, got {args.nfe!r}")
    for name in ("num_train", "num_val", "iters"):
        positive(getattr(args, name), "--" + name.replace("_", "-"))
    positive(args.seed, "--seed", 0)
    positive(args.step, "--step", 0)
    if not math.isfinite(args.guidance):
        raise CLIError(f"--guidance must be finite, got {args.guidance}")
    try:
        solver = S.get(args.solver)
    except (KeyError, ValueError, TypeError) as e:
        raise CLIError(f"--solver: {e}") from None
    if solver.stochastic:
        raise CLIError(f"--solver {args.solver} is stochastic: grids are tuned for deterministic solvers")
    for n in nfes:
        steps = solver.num_steps(n)
        if steps < max(1, solver.min_steps):
            raise CLIError(f"--nfe {n} is below what {solver.name} needs ({solver.min_steps} steps)")
    if args.run is not None and not os.path.isdir(args.run):
        raise CLIError(f"run directory not found: {args.run}")
    writable_path(args.out, "--out", directory=False)
    if os.path.exists(args.out):  # an existing file must be a grid file (its model is checked in run)
        try:
            T.read_grids(args.out)
        except ValueError as e:
            raise CLIError(f"--out: {e}; choose another file") from None
    return dict(solver=solver, nfes=nfes)


def _model(args):
    """``(denoiser, sample shape, number of classes)``."""
    if args.run is None:
        try:
            den, cfg = pretrained(args.pretrained, guidance=args.guidance)
        except ValueError as e:
            raise CLIError(str(e)) from None
        return den, tuple(cfg.data.shape), int(cfg.model.network.num_classes or 0)

    cfg, info, run_, state, step = load_run_state(args.run, args.step)
    params = to_host(state.ema_params if state.ema_params is not None else state.params)
    return run_denoiser(denoiser_apply(run_), run_, params, args.guidance), tuple(run_.data_shape), run_.num_classes


def run(args, resolved) -> int:

    run_dir = None if args.run is None else os.path.abspath(args.run)
    if run_dir is not None and os.path.commonpath([os.path.abspath(args.out), run_dir]) == run_dir:
        with lock_run(run_dir):  # grids written into a run: one writer at a time, as training
            return _tune(args, resolved)
    return _tune(args, resolved)


def _tune(args, resolved) -> int:

    den, shape, nc = _model(args)
    options = {} if args.method == "gits" else dict(iters=args.iters)
    try:
        T.check_grid_file(args.out, model=T.model_fingerprint(den), process=den.process)  # before the work
        rows = T.tune(
            den,
            resolved["solver"],
            resolved["nfes"],
            shape=shape,
            method=args.method,
            num_train=args.num_train,
            num_val=args.num_val,
            seed=args.seed,
            num_classes=nc,
            out=args.out,
            progress=not args.no_progress,
            **options,
        )
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"held-out L2 to the teacher (mean / median / far: > {rows[0]['heldout']['far_factor']:g}x the fixed median)")
    print(
        f"{'nfe':>4} {'fit mean':>9} {'median':>9} {'far':>4}  {'best fixed':>10} {'mean':>9} {'median':>9} {'far':>4}"
        f"  {'kept':>5} {'fit s':>7}"
    )
    for r in rows:
        f, b = r["heldout"]["fit"], r["heldout"]["fixed"]
        print(
            f"{r['nfe']:>4} {f['mean']:>9.4g} {f['median']:>9.4g} {f['far']:>4}  {b['kind']:>10} {b['mean']:>9.4g} "
            f"{b['median']:>9.4g} {b['far']:>4}  {r['kept']:>5} {r['seconds']:>7.1f}"
        )
    for r in rows:
        if r["kept"] == "fixed":
            print(r["verdict"])
    print(f"grids for {resolved['solver'].name} ({args.method}) -> {args.out}")
    return 0
