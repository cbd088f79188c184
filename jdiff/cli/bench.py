"""``jdiff bench``: sample quality against NFE for every solver (the main job).

Parses and checks the options, then calls :func:`jdiff.bench.bench` (the recipes: the
shipped digits model with FD-digits, accuracy and the ODE error; the Gaussian-mixture
testbed; a trained run with FD-digits or FID), or with ``--model`` a pretrained
diffusers-format model's FID sweep (:func:`jdiff.bench_model.model_bench`), and prints
one line per finished sweep (and with ``--model`` one per finished cell).
Cells finished by an interrupted sweep are kept and not recomputed.
"""

from __future__ import annotations

import math
import os
import sys
import time

from jdiff import bench as B
from jdiff import bench_model as BM
from jdiff import solvers as S
from jdiff._grid import GRID_KINDS
from jdiff.cli._common import CLIError, positive, writable_path
from jdiff.features import FID_WEIGHTS_FILE, INCEPTION_DIM
from jdiff.metrics import check_fid_sample_count, load_stats

HELP = "sample quality (FD) against NFE for every solver"

DEFAULT_NFES = B.DEFAULT_NFES


def add_parser(sub, formatter, solver_names: list[str]):
    b = sub.add_parser(
        "bench",
        formatter_class=formatter,
        help=HELP,
        description="For every solver and NFE, generate samples from the same seeds and score them: FD-digits "
        "(the Frechet distance in the features of jdiff's shipped digits classifier; not FID) and class accuracy "
        "for the shipped digits model, or FID with InceptionV3 weights for a trained run; plus the exact Frechet "
        "distance on a Gaussian-mixture testbed; with --model, FID of a pretrained diffusers-format model (pixel or "
        "latent, decoded by its VAE) against --reference; for the digits model also the mean L2 distance of each "
        "cell's samples to the model's converged ODE solution from the same noises (ode_l2), which ranks solvers "
        "past NFE 8. Writes results.csv, results.md and fd_vs_nfe.png per sweep under --out; rerunning an "
        "interrupted sweep continues where it stopped.",
        epilog="examples:\n  jdiff bench        # the main job: shipped digits model + testbed\n"
        "  jdiff bench --solvers dpm++2m,unipc3,ddim --nfe 5,10,20 --num 500\n"
        "  jdiff bench --run runs/digits --ref heldout_stats.npz --out runs/digits/bench\n"
        "  jdiff bench --model ddpm-cifar10-32 --reference cifar10_stats.npz --inception "
        "pt_inception-2015-12-05-6726825d.pth --solvers ddim,dpm++2m,unipc3 --nfe 5,10,20 --samples 10000 "
        "--batch-size 500 --out bench_cifar\n"
        "  jdiff bench --run runs/cifar --inception pt_inception-2015-12-05-6726825d.pth --ref cifar10_stats.npz "
        "--num 10000\n"
        f"solvers: {', '.join(solver_names)}",
    )
    b.add_argument("--run", metavar="DIR", help="run directory of 'jdiff train' (default: the shipped digits model)")
    b.add_argument(
        "--model",
        metavar="PATH",
        help="a pretrained diffusers-format folder (config.json, scheduler_config.json, weights; a latent model's "
        "VAE beside it): its FID sweep against --reference",
    )
    b.add_argument(
        "--reference",
        metavar="REF",
        help="with --model: reference statistics .npz (keys mu, sigma; pytorch-fid, clean-fid) or a folder of "
        "images (PNG, JPEG) whose statistics are computed once and kept in --out",
    )
    b.add_argument("--step", type=int, metavar="STEP", help="checkpoint step of --run (default: the newest)")
    b.add_argument("--solvers", metavar="A,B,..", help="registry names (default: every solver of the registry)")
    b.add_argument("--nfe", metavar="N,M,..", help=f"NFE list (default: {','.join(map(str, DEFAULT_NFES))})")
    b.add_argument("--num", "--samples", type=int, default=100, metavar="M", help="samples per (solver, NFE) cell")
    b.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed shared by every cell")
    b.add_argument("--guidance", type=float, default=1.0, metavar="W", help="classifier-free guidance scale")
    b.add_argument("--batch-size", type=int, default=0, metavar="B", help="samples per device program (0: all)")
    b.add_argument(
        "--grid-kind",
        default="default",
        metavar="KIND",
        help=f"time grid kind: default, {', '.join(GRID_KINDS)}; with --model also 'model' (its scheduler's grid)",
    )
    b.add_argument("--ref", metavar="FILE", help="reference statistics .npz with keys mu, sigma (pytorch-fid format)")
    b.add_argument(
        "--ref-data",
        metavar="PATH",
        help="reference images: a folder of image files, or an .npy/.npz array (n, H, W, C) in [-1, 1]; "
        "statistics computed here (default for --run: the run's own training data)",
    )
    b.add_argument(
        "--inception", metavar="WEIGHTS", help="InceptionV3 weights (.pth or .npz): FID instead of FD-digits"
    )
    b.add_argument(
        "--ode-steps",
        type=int,
        metavar="N",
        help=f"steps of the converged {B.ODE_SOLVER} reference of the ode_l2 column (0: no column; default: "
        f"{B.ODE_STEPS} for the shipped digits model, no column for --run)",
    )
    b.add_argument("--no-testbed", action="store_true", help="skip the Gaussian-mixture testbed sweep")
    b.add_argument("--testbed-only", action="store_true", help="run only the testbed sweep")
    b.add_argument("--out", default="bench_results", metavar="DIR", help="results folder")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(fn=run, check=resolve)
    return b


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise CLIError(f"{what} must list positive integers, got {text!r}")
    return sorted(set(vals))


def resolve(args):
    """Every check that needs no sampling: names, numbers, files."""
    positive(args.num, "--num", 2)
    positive(args.seed, "--seed", 0)
    positive(args.batch_size, "--batch-size", 0)
    positive(args.step, "--step", 0)
    positive(args.ode_steps, "--ode-steps", 0)
    if not str(args.out).strip():
        raise CLIError("--out must name a folder, got ''")
    writable_path(args.out, "--out", directory=True)  # before any work: not after the sweep
    if not math.isfinite(args.guidance):
        raise CLIError(f"--guidance must be finite, got {args.guidance}")
    names = [s.strip() for s in args.solvers.split(",") if s.strip()] if args.solvers else S.names()
    unknown = []
    for n in names:
        try:
            S.get(n)
        except (KeyError, ValueError):
            unknown.append(n)
    if unknown:
        raise CLIError(f"--solvers: unknown solver(s) {', '.join(unknown)}; known: {', '.join(S.names())}")
    nfes = _ints(args.nfe, "--nfe") if args.nfe else list(DEFAULT_NFES)
    if args.no_testbed and args.testbed_only:
        raise CLIError("--no-testbed and --testbed-only exclude each other")
    kinds = ("default", *GRID_KINDS) + ((BM.MODEL_GRID,) if args.model else ())
    if args.grid_kind not in kinds:
        raise CLIError(f"--grid-kind: unknown kind {args.grid_kind!r}; valid kinds: {', '.join(kinds)}")
    if args.model is not None:
        _check_model(args)
        return dict(names=names, nfes=nfes)
    if args.reference:
        raise CLIError("--reference applies to --model (--run takes --ref or --ref-data)")
    if args.run is not None and not os.path.isdir(args.run):
        raise CLIError(f"run directory not found: {args.run}")
    if args.run is None and (args.ref or args.ref_data or args.inception or args.step is not None):
        raise CLIError("--ref, --ref-data, --inception and --step apply to --run")
    ref = None
    if args.ref:
        try:
            ref = load_stats(args.ref)
        except (ValueError, OSError) as e:
            raise CLIError(f"--ref {args.ref}: {e}") from None
    if args.ref_data and not os.path.exists(args.ref_data):
        raise CLIError(f"--ref-data: not found: {args.ref_data}")
    if args.inception and not os.path.isfile(args.inception):
        raise CLIError(f"--inception: file not found: {args.inception}")
    dim = 2048 if args.inception else 64
    if ref is not None and ref[0].shape[0] != dim:
        raise CLIError(f"--ref {args.ref}: statistics of dimension {ref[0].shape[0]}, the features have {dim}")
    if args.inception or args.run is not None:
        try:
            check_fid_sample_count(args.num, dim)
        except ValueError as e:
            raise CLIError(f"--num: {e}") from None
    return dict(names=names, nfes=nfes, ref=ref)


def _check_model(args) -> None:
    """The checks of ``--model`` that need no loading: exclusive options, files, sample count."""
    other = [o for o, v in (("--run", args.run), ("--step", args.step), ("--ref", args.ref)) if v is not None]
    other += [o for o, v in (("--ref-data", args.ref_data), ("--testbed-only", args.testbed_only)) if v]
    if other:
        raise CLIError(f"--model excludes {', '.join(other)} (the reference is --reference)")
    if not os.path.isdir(args.model):
        raise CLIError(f"--model: model folder not found: {args.model}")
    if not args.reference:
        raise CLIError("--model needs --reference: statistics .npz (mu, sigma) or a folder of images")
    if not args.inception:
        raise CLIError(f"--model needs --inception: InceptionV3 weights (pytorch-fid's {FID_WEIGHTS_FILE})")
    if not os.path.isfile(args.inception):
        raise CLIError(f"--inception: file not found: {args.inception}")
    if not os.path.exists(args.reference):
        raise CLIError(f"--reference: not found: {args.reference}")
    if not os.path.isdir(args.reference):
        try:
            mu, _ = load_stats(args.reference)
        except ValueError as e:
            raise CLIError(f"--reference {args.reference}: {e}") from None
        if mu.shape[0] != INCEPTION_DIM:
            raise CLIError(
                f"--reference {args.reference}: statistics of dimension {mu.shape[0]}, FID's have {INCEPTION_DIM}"
            )
    try:
        check_fid_sample_count(args.num, INCEPTION_DIM)
    except ValueError as e:
        raise CLIError(f"--samples: {e}") from None


def run(args, resolved) -> int:
    settings = B.BenchSettings(
        solvers=resolved["names"],
        nfes=resolved["nfes"],
        num=args.num,
        seed=args.seed,
        guidance=args.guidance,
        batch_size=args.batch_size,
        grid_kind=args.grid_kind,
        ode_steps=args.ode_steps,
        progress=not args.no_progress,
    )
    t0 = time.perf_counter()
    if args.model is not None:
        try:
            res = BM.model_bench(args.model, args.out, args.reference, settings, inception=args.inception, report=print)
        except ValueError as e:
            raise CLIError(str(e)) from None
        print(f"model sweep: {len(res.rows)} cells in {res.seconds:.0f} s -> {os.path.join(args.out, 'results.md')}")
        print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return 0
    if args.run is not None:
        options = dict(step=args.step, ref=resolved["ref"], ref_data=args.ref_data, inception=args.inception)
    else:
        options = dict(digits=not args.testbed_only, testbed=not args.no_testbed)
    try:
        B.bench(args.out, settings, run=args.run, report=print, **options)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0
