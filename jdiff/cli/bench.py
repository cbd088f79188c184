"""``jdiff bench``: sample quality against NFE for every solver (the main job).

Without ``--run`` it evaluates the digits model shipped with jdiff (FD-digits against
held-out real digits, and the FD-digits classifier's accuracy on class-conditional
samples) and the same sweep on a Gaussian-mixture testbed with the exact Frechet
distance to the true distribution. With ``--run DIR`` it evaluates a trained run against
reference statistics (``--ref stats.npz``, the pytorch-fid format) or a data file, with
InceptionV3 features when ``--inception`` weights are given (FID) and FD-digits
otherwise. Cells finished by an interrupted sweep are kept and not recomputed.
"""

from __future__ import annotations

import math
import os
import sys
import time

from jdiff.cli._common import CLIError, positive

HELP = "sample quality (FD) against NFE for every solver"

DEFAULT_NFES = (3, 4, 5, 6, 8, 10, 15, 20, 50)
TESTBED_DIM = 8
TESTBED_NUM = 4000


def add_parser(sub, formatter, solver_names: list[str]):
    b = sub.add_parser(
        "bench",
        formatter_class=formatter,
        help=HELP,
        description="For every solver and NFE, generate samples from the same seeds and score them: FD-digits "
        "(the Frechet distance in the features of jdiff's shipped digits classifier; not FID) and class accuracy "
        "for the shipped digits model, or FID with InceptionV3 weights for a trained run; plus the exact Frechet "
        "distance on a Gaussian-mixture testbed. Writes results.csv, results.md and fd_vs_nfe.png per sweep "
        "under --out; rerunning an interrupted sweep continues where it stopped.",
        epilog="examples:\n  jdiff bench        # the main job: shipped digits model + testbed\n"
        "  jdiff bench --solvers dpm++2m,unipc3,ddim --nfe 5,10,20 --num 500\n"
        "  jdiff bench --run runs/digits --ref heldout_stats.npz --out runs/digits/bench\n"
        "  jdiff bench --run runs/cifar --inception pt_inception-2015-12-05-6726825d.pth --ref cifar10_stats.npz "
        "--num 10000\n"
        f"solvers: {', '.join(solver_names)}",
    )
    b.add_argument("--run", metavar="DIR", help="run directory of 'jdiff train' (default: the shipped digits model)")
    b.add_argument("--step", type=int, metavar="STEP", help="checkpoint step of --run (default: the newest)")
    b.add_argument("--solvers", metavar="A,B,..", help="registry names (default: every solver of the registry)")
    b.add_argument("--nfe", metavar="N,M,..", help=f"NFE list (default: {','.join(map(str, DEFAULT_NFES))})")
    b.add_argument("--num", type=int, default=100, metavar="M", help="samples per (solver, NFE) cell")
    b.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed shared by every cell")
    b.add_argument("--guidance", type=float, default=1.0, metavar="W", help="classifier-free guidance scale")
    b.add_argument("--batch-size", type=int, default=0, metavar="B", help="samples per device program (0: all)")
    b.add_argument("--grid-kind", default="default", metavar="KIND", help="time grid kind")
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
    from jdiff import solvers as S

    positive(args.num, "--num", 2)
    positive(args.seed, "--seed", 0)
    positive(args.batch_size, "--batch-size", 0)
    positive(args.step, "--step", 0)
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
    if args.run is not None and not os.path.isdir(args.run):
        raise CLIError(f"run directory not found: {args.run}")
    if args.run is None and (args.ref or args.ref_data or args.inception or args.step is not None):
        raise CLIError("--ref, --ref-data, --inception and --step apply to --run")
    ref = None
    if args.ref:
        from jdiff.metrics import load_stats

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
        from jdiff.metrics import check_fid_sample_count

        try:
            check_fid_sample_count(args.num, dim)
        except ValueError as e:
            raise CLIError(f"--num: {e}") from None
    return dict(names=names, nfes=nfes, ref=ref)


# ----------------------------------------------------------------------------- metrics
def _digits_metrics(classifier, ref, labels):
    from jdiff.metrics import frechet_distance

    def metrics(x):
        mu, sigma = classifier.stats(x)
        out = {"fd_digits": frechet_distance(mu, sigma, *ref)}
        if labels is not None:
            out["accuracy"] = classifier.accuracy(x, labels)
        return out

    return metrics


def _feature_metrics(extractor, ref, name: str, to_unit: bool):
    import numpy as np

    from jdiff.metrics import StreamingStats, frechet_distance

    def metrics(x):
        imgs = np.clip((x + 1.0) / 2.0, 0.0, 1.0) if to_unit else x
        st = StreamingStats()
        st.update(extractor(imgs))
        return {name: frechet_distance(st.mean, st.cov, *ref)}

    return metrics


def _summary(rows, metric: str, floor: float | None, out: str, title: str) -> None:
    from jdiff.sweep import write_results

    write_results(rows, out, metric=metric, title=title)
    with open(os.path.join(out, "results.md"), "a") as f:
        if floor is not None:
            f.write(f"\nFloor: {metric} of real data against the reference at the same sample count = {floor:.4g}\n")
        if any("accuracy" in r for r in rows):
            from jdiff.sweep import markdown_table

            f.write("\n" + markdown_table(rows, "accuracy", title="classifier accuracy on class-conditional samples"))


def _sweep(den, shape, names, nfes, args, metrics, out, settings, label, cond=None):
    from jdiff.sweep import nfe_sweep

    try:
        return nfe_sweep(
            den,
            shape,
            solvers=names,
            nfes=nfes,
            num=args.num if label != "testbed" else TESTBED_NUM,
            metrics=metrics,
            cond=cond,
            seed=args.seed,
            batch_size=args.batch_size,
            grid_kind=args.grid_kind,
            out_dir=out,
            settings=settings,
            progress=not args.no_progress,
            label=label,
        )
    except ValueError as e:
        raise CLIError(str(e)) from None


def _testbed(names, nfes, args) -> None:
    import jax
    import numpy as np

    import jdiff
    from jdiff import testbed
    from jdiff.metrics import frechet_distance, gaussian_stats

    mix = testbed.random_mixture(jax.random.key(0), TESTBED_DIM, 6)
    process = jdiff.vp_cosine()
    mu, cov = np.asarray(mix.mean(), np.float64), np.asarray(mix.cov(), np.float64)

    def metrics(x):
        return {"fd_exact": frechet_distance(*gaussian_stats(x), mu, cov)}

    # the floor: exact samples of the mixture at the same count (mean over 5 draws; the
    # finite-sample distance of a perfect sampler)
    draws = [metrics(np.asarray(mix.sample(jax.random.key(100 + i), TESTBED_NUM)))["fd_exact"] for i in range(5)]
    floor = float(np.mean(draws))
    out = os.path.join(args.out, "testbed")
    settings = dict(model=f"gmm(dim={TESTBED_DIM}, components=6, key=0)", process=process.name, metric="fd_exact")
    t0 = time.perf_counter()
    rows = _sweep(mix.denoiser(process), (TESTBED_DIM,), names, nfes, args, metrics, out, settings, "testbed")
    _summary(rows, "fd_exact", floor, out, "Gaussian-mixture testbed: exact Frechet distance to the true distribution")
    print(f"testbed sweep: {len(rows)} cells in {time.perf_counter() - t0:.0f} s -> {out}/results.md")


def _digits(names, nfes, args) -> None:
    import numpy as np

    from jdiff import presets
    from jdiff.features.digits import digits_classifier, digits_split

    clf = digits_classifier()
    x_train, _, x_held, _ = digits_split()
    ref = clf.stats(x_held)
    # the floor: real training digits at the same count (a seeded subset), whose distance
    # to the held-out set is the Frechet estimator's bias at this sample count
    n = min(args.num, len(x_train))
    pick = np.random.default_rng(args.seed).choice(len(x_train), n, replace=False)
    floor = _digits_metrics(clf, ref, None)(x_train[pick])["fd_digits"]
    den, cfg = presets.pretrained("digits", guidance=args.guidance)
    labels = (np.arange(args.num) % 10).astype(np.int32)
    out = os.path.join(args.out, "digits")
    settings = dict(model="pretrained:digits", guidance=args.guidance, metric="fd_digits")
    t0 = time.perf_counter()
    rows = _sweep(den, (8, 8, 1), names, nfes, args, _digits_metrics(clf, ref, labels), out, settings, "digits", labels)
    _summary(rows, "fd_digits", floor, out, "shipped digits model: FD-digits against held-out digits")
    print(f"digits sweep: {len(rows)} cells in {time.perf_counter() - t0:.0f} s -> {out}/results.md")


def _load_images(path: str, shape):
    import numpy as np

    if os.path.isdir(path):
        from jdiff.data import load_image_folder

        try:
            return load_image_folder(path, int(shape[0]), int(shape[-1]))[0]
        except (ValueError, OSError) as e:
            raise CLIError(f"--ref-data {path}: {e}") from None

    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CLIError(f"--ref-data {path}: not a NumPy .npy/.npz file ({e})") from None
    if hasattr(data, "files"):
        key = "images" if "images" in data.files else data.files[0]
        data = data[key]
    x = np.asarray(data, np.float32)
    if x.ndim != 4 or not np.all(np.isfinite(x)):
        raise CLIError(f"--ref-data {path}: expected finite images (n, H, W, C), got shape {x.shape}")
    return x


def _trained_run(names, nfes, args, ref) -> None:
    import numpy as np

    from jdiff.cli import _run as R
    from jdiff.cli._common import denoiser, denoiser_apply, to_host

    cfg, info, run_, state, step = R.load_run_state(args.run, args.step)
    params = to_host(state.ema_params if state.ema_params is not None else state.params)
    nc = run_.num_classes
    den = denoiser(denoiser_apply(run_), run_, params, args.guidance if nc else 1.0)
    labels = (np.arange(args.num) % nc).astype(np.int32) if nc else None
    if args.inception:
        from jdiff.features import InceptionExtractor

        ext = InceptionExtractor(args.inception)
        name, metrics_of = "fid", lambda r: _feature_metrics(ext, r, "fid", True)
        stats_of = lambda x: _stats(ext((x + 1.0) / 2.0))  # noqa: E731
    else:
        if tuple(run_.data_shape) != (8, 8, 1):
            raise CLIError(f"FD-digits needs 8x8x1 images, this run makes {run_.data_shape}: give --inception WEIGHTS")
        from jdiff.features.digits import digits_classifier

        clf = digits_classifier()
        name, metrics_of = "fd_digits", lambda r: _digits_metrics(clf, r, labels)
        stats_of = clf.stats
    if ref is None:
        x_ref = _load_images(args.ref_data, run_.data_shape) if args.ref_data else cfg.data.load()[0]
        if tuple(x_ref.shape[1:]) != tuple(run_.data_shape):
            raise CLIError(f"reference images have shape {x_ref.shape[1:]}, the model makes {run_.data_shape}")
        ref = stats_of(x_ref)
    out = os.path.join(args.out)
    settings = dict(model=f"{os.path.abspath(args.run)}@{step}", guidance=args.guidance, metric=name)
    rows = _sweep(den, run_.data_shape, names, nfes, args, metrics_of(ref), out, settings, "run", labels)
    _summary(rows, name, None, out, f"{cfg.name} step {step}: {name}")
    print(f"sweep: {len(rows)} cells -> {out}/results.md")


def _stats(feats):
    from jdiff.metrics import gaussian_stats

    return gaussian_stats(feats)


def run(args, resolved) -> int:
    names, nfes, ref = resolved["names"], resolved["nfes"], resolved["ref"]
    t0 = time.perf_counter()
    if args.run is not None:
        _trained_run(names, nfes, args, ref)
    else:
        if not args.testbed_only:
            _digits(names, nfes, args)
        if not args.no_testbed:
            _testbed(names, nfes, args)
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0
