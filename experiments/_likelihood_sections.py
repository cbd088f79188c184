"""The likelihood, Ito-density and SuperDiff sections of ``experiments/inversion_likelihood.py``.

Each ``run_*`` takes the parsed arguments (an ``argparse.Namespace``; missing fields take
the defaults of :func:`add_arguments`) and returns a dict of the numbers it printed.

- ``run_likelihood``: bits per dimension of the shipped digits model
  (``jdiff.presets.pretrained("digits")``) on held-out digits
  (``jdiff.features.digits.digits_split``), exact and Hutchinson divergence, with the
  standard error over samples and the time per sample. The digits are scikit-learn's
  pixel counts ``0..16`` scaled ``v / 8 - 1`` (:func:`jdiff.data.digits`): 17 levels,
  bins of width ``1/8``, so the dequantization offset is ``-log2(1/8) = 3`` bits (not the
  8-bit ``log2(127.5)``). The denoiser was trained on all 1797 digits, held-out split
  included: for the denoiser these digits are not held out.
- ``run_ito``: on a Gaussian-mixture testbed, the PF-ODE log-likelihood (exact and
  Hutchinson) and the Ito density along DDPM trajectories against the exact log-density.
- ``run_superdiff``: OR and AND of two class-conditional digits prompts (the same model
  with two labels) with the digits classifier's verdict on the outputs.

Run alone: ``python experiments/_likelihood_sections.py --section likelihood|ito|superdiff|all``.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

DEFAULTS = dict(
    seed=0,
    num_bpd=450,  # held-out digits for the Hutchinson bits/dim (all of them)
    num_exact=32,  # held-out digits for the exact divergence and the adaptive check
    bpd_steps=16,  # RK4 steps (4 evaluations each)
    rtol=1e-5,
    batch=16,
    superdiff_num=100,
    superdiff_steps=50,
    pairs="1,7;3,8;0,6",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this file's options (the defaults above) to ``parser``."""
    for k, v in DEFAULTS.items():
        parser.add_argument("--" + k.replace("_", "-"), dest=k, type=type(v), default=v)


def _arg(args, name):
    return getattr(args, name, DEFAULTS[name])


def _mean_se(a):
    a = np.asarray(a, np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")


def _digits():
    import jdiff.presets
    from jdiff.features.digits import digits_split

    den, cfg = jdiff.presets.pretrained("digits")
    _, _, xh, yh = digits_split()
    return den, cfg, xh, yh


def _bpd_batches(den, x, y, key, batch, **kw):
    """bits/dim of ``x`` in batches (one compiled program: the last batch is padded);
    returns (bpd array, seconds per sample after compilation, log_prob array)."""
    from jdiff import likelihood as L

    deq = L.Dequantization(17)
    n = x.shape[0]
    pad = (-n) % batch
    xp = np.concatenate([x, x[:pad]]) if pad else x
    yp = np.concatenate([y, y[:pad]]) if pad else y
    keys = jax.random.split(key, xp.shape[0])  # one key per sample: independent of batching
    # compile on the first batch (timed apart)
    t0 = time.perf_counter()

    def run(i):
        sl = slice(i, i + batch)
        return L.bits_per_dim(den, jnp.asarray(xp[sl]), keys[sl], dequantization=deq, cond=jnp.asarray(yp[sl]), **kw)

    jax.block_until_ready(run(0))
    compile_s = time.perf_counter() - t0
    out, lps = [], []
    t0 = time.perf_counter()
    for i in range(0, xp.shape[0], batch):
        r = run(i)
        out.append(np.asarray(r.bpd))
        lps.append(np.asarray(r.log_prob))
    per = (time.perf_counter() - t0) / xp.shape[0]
    return np.concatenate(out)[:n], per, compile_s, np.concatenate(lps)[:n]


def run_likelihood(args) -> dict:
    """Bits/dim of the digits model on held-out digits: Hutchinson (1 Rademacher probe)
    on ``num_bpd`` digits and the exact divergence on the first ``num_exact``, both by
    classic RK4 with ``bpd_steps`` log-SNR steps in t (64 evaluations at 16 steps); the
    grid's own error is measured against adaptive Tsit5 (``rtol``) on the same digits,
    dequantization noise and probes."""
    den, cfg, xh, yh = _digits()
    seed, batch = _arg(args, "seed"), _arg(args, "batch")
    key = jax.random.key(seed)
    n_h, n_e, steps, rtol = _arg(args, "num_bpd"), _arg(args, "num_exact"), _arg(args, "bpd_steps"), _arg(args, "rtol")
    n_h, n_e = min(n_h, len(xh)), min(n_e, len(xh))
    res = {}
    print(
        f"[likelihood] digits model, held-out digits (17 levels in [-1, 1]: offset 3 bits); "
        f"the denoiser saw these digits in training. {jax.devices()[0].platform}, batch {batch}"
    )
    grid_kw = dict(method="rk4", num_steps=steps, time="t")
    runs = (
        ("hutchinson", n_h, dict(divergence="hutchinson", num_probes=1, **grid_kw)),
        ("exact", n_e, dict(divergence="exact", **grid_kw)),
        ("hutchinson_adaptive", n_e, dict(divergence="hutchinson", num_probes=1, rtol=rtol, atol=rtol)),
    )
    vals = {}
    for name, n, kw in runs:
        bpd, per, comp, _ = _bpd_batches(den, xh[:n], yh[:n], key, min(batch, n), **kw)
        vals[name] = bpd
        m, se = _mean_se(bpd)
        res[name] = dict(n=n, bpd=m, se=se, s_per_sample=per, first_call_s=comp)
        how = f"RK4 {steps} steps in t" if "method" in kw else f"Tsit5 rtol=atol={rtol:g}"
        print(
            f"  {name:20s} {how}, {n} digits: {m:.3f} +- {se:.3f} bits/dim, {per:.2f} s/sample "
            f"(first call {comp:.0f} s, compile included)"
        )
    d = vals["hutchinson"][:n_e] - vals["exact"]
    g = vals["hutchinson"][:n_e] - vals["hutchinson_adaptive"]
    res["hutchinson_minus_exact"] = dict(mean=float(d.mean()), se=float(d.std(ddof=1) / math.sqrt(d.size)))
    res["grid_minus_adaptive"] = dict(mean=float(g.mean()), max_abs=float(np.abs(g).max()))
    print(
        f"  Hutchinson - exact (same {n_e} digits, noise, grid): {d.mean():+.4f} +- "
        f"{d.std(ddof=1) / math.sqrt(d.size):.4f} bits/dim"
    )
    print(f"  RK4 grid - adaptive (same digits, noise, probes): mean {g.mean():+.4f}, max |diff| {np.abs(g).max():.4f}")
    return res


def run_ito(args) -> dict:
    """Testbed: PF-ODE log-likelihood (exact, Hutchinson) and the Ito density along DDPM
    trajectories against the exact log-density."""
    import jdiff
    from jdiff import likelihood as L
    from jdiff import solvers as S
    from jdiff.testbed import random_mixture

    res = {}
    with jax.enable_x64(True):
        proc = jdiff.vp_linear()
        for dim in (2, 16):
            mix = random_mixture(jax.random.key(0), dim, 4, std_range=(0.2, 0.5))
            den = mix.denoiser(proc)
            x = mix.sample(jax.random.key(1), 64, jnp.float64)
            exact = np.asarray(mix.data_log_prob(x))
            prior = lambda xt, mix=mix: mix.log_prob(xt, proc.t_max, proc)
            t0 = time.perf_counter()
            r = L.log_likelihood(den, x, rtol=1e-8, atol=1e-8, time="rho", t_start=0.0, prior_log_prob=prior)
            err_e = np.abs(np.asarray(r.log_prob) - exact) / dim
            te = time.perf_counter() - t0
            r = L.log_likelihood(
                den, x, key=jax.random.key(2), divergence="hutchinson", num_probes=16, rtol=1e-8, atol=1e-8,
                time="rho", t_start=0.0, prior_log_prob=prior,
            )  # fmt: skip
            dev = np.asarray(r.per_probe) - exact[:, None]
            se = math.sqrt(np.sum(dev.var(1, ddof=1) / dev.shape[1])) / dev.shape[0]
            r0 = L.log_likelihood(den, x, rtol=1e-8, atol=1e-8, time="rho", t_start=0.0)  # default N(0, 1) prior
            err_p = np.abs(np.asarray(r0.log_prob) - exact) / dim
            res[f"pf_ode_d{dim}"] = dict(
                exact_max_err_per_dim=float(err_e.max()),
                hutchinson_mean_err=float(dev.mean()),
                hutchinson_se=se,
                gaussian_prior_max_err_per_dim=float(err_p.max()),
            )
            print(
                f"[ito] PF-ODE, {dim}-D mixture, 64 points, float64: exact divergence max |err| "
                f"{err_e.max():.2e} nats/dim ({te:.1f} s); Hutchinson (16 probes) mean err {dev.mean():+.4f} "
                f"+- {se:.4f} nats; with the N(0,1) prior instead of the exact p_T: max |err| "
                f"{err_p.max():.2e} nats/dim"
            )
        mix = random_mixture(jax.random.key(0), 2, 4, std_range=(0.2, 0.5))
        den = mix.denoiser(proc)
        for N in (50, 200, 800):
            grid = jdiff.time_grid(proc, N, dtype=jnp.float64)
            x_T = jdiff.prior_sample(proc, jax.random.key(3), (512, 2), jnp.float64)
            _, info = jdiff.sample(S.ddpm(), den, x_T, grid, key=jax.random.key(4), return_info=True, trajectory=True)
            est = L.ito_log_density(proc, info.xs, info.epss, grid, log_prob_T=mix.log_prob(info.xs[0], grid[0], proc))
            ex = jax.vmap(lambda xx, t: mix.log_prob(xx, t, proc))(info.xs, grid)
            err = np.asarray(est - ex)
            mid = N // 2
            res[f"ito_N{N}"] = dict(
                rms_mid=float(np.sqrt(np.mean(err[mid] ** 2))),
                rms_end=float(np.sqrt(np.mean(err[-1] ** 2))),
                mean_end=float(err[-1].mean()),
                spread_end=float(np.std(np.asarray(ex[-1]))),
            )
            print(
                f"[ito] Ito density along DDPM, 2-D mixture, {N} steps, 512 trajectories: error at t_mid rms "
                f"{res[f'ito_N{N}']['rms_mid']:.3f}, at t_min rms {res[f'ito_N{N}']['rms_end']:.3f} "
                f"(mean {err[-1].mean():+.3f}) nats; spread of the true log p at t_min {np.std(np.asarray(ex[-1])):.2f}"
            )
    return res


def run_superdiff(args) -> dict:
    """OR and AND of two class-conditional digits prompts, judged by the digits classifier."""
    import jdiff
    from jdiff import solvers as S
    from jdiff.features.digits import digits_classifier
    from jdiff.superdiff import sample_superdiff

    den, cfg, _, _ = _digits()
    clf = digits_classifier()
    n, steps, seed = _arg(args, "superdiff_num"), _arg(args, "superdiff_steps"), _arg(args, "seed")
    pairs = [tuple(int(v) for v in p.split(",")) for p in _arg(args, "pairs").split(";")]
    proc = den.process
    grid = jdiff.time_grid(proc, steps)
    shape = (n,) + tuple(cfg.data.shape)
    x_T = jdiff.prior_sample(proc, jax.random.key(seed), shape)
    key = jax.random.key(seed + 1)
    res = {}
    print(f"[superdiff] digits model, {n} samples per run, DDPM {steps} steps (2 model calls per step)")
    for a, b in pairs:
        la, lb = jnp.full((n,), a, jnp.int32), jnp.full((n,), b, jnp.int32)
        row = {}
        for name in ("single_a", "single_b", "or", "and"):
            t0 = time.perf_counter()
            if name.startswith("single"):
                x = jdiff.sample(S.ddpm(), den, x_T, grid, key=key, cond=la if name == "single_a" else lb)
                kap = None
            else:
                x, info = sample_superdiff([den, den], x_T, grid, key=key, mode=name, conds=[la, lb], return_info=True)
                kap = np.asarray(info.kappa)
            x = np.asarray(jax.block_until_ready(x))
            wall = time.perf_counter() - t0
            p = clf.probs(np.clip(x, -1, 1))
            pred = p.argmax(1)
            row[name] = dict(
                frac_a=float(np.mean(pred == a)),
                frac_b=float(np.mean(pred == b)),
                frac_other=float(np.mean((pred != a) & (pred != b))),
                mean_p_a=float(p[:, a].mean()),
                mean_p_b=float(p[:, b].mean()),
                both_p_over_0_2=float(np.mean((p[:, a] > 0.2) & (p[:, b] > 0.2))),
                kappa_a_median=None if kap is None else float(np.median(kap[..., 0])),
                kappa_absmax=None if kap is None else float(np.abs(kap).max()),
                finite=bool(np.all(np.isfinite(x))),
                wall_s=wall,
            )
            r = row[name]
            extra = (
                ""
                if kap is None
                else f", kappa_a median {r['kappa_a_median']:.2f}, max |kappa| {r['kappa_absmax']:.3g}"
            )
            print(
                f"  {a}|{b} {name:8s}: classified {a}: {r['frac_a']:.2f}, {b}: {r['frac_b']:.2f}, other: "
                f"{r['frac_other']:.2f}; mean p({a}) {r['mean_p_a']:.2f}, p({b}) {r['mean_p_b']:.2f}; "
                f"both p > 0.2: {r['both_p_over_0_2']:.2f}{extra} ({wall:.1f} s)"
            )
        res[f"{a},{b}"] = row
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", choices=["likelihood", "ito", "superdiff", "all"], default="all")
    add_arguments(parser)
    args = parser.parse_args(argv)
    out = {}
    for name, fn in (("ito", run_ito), ("superdiff", run_superdiff), ("likelihood", run_likelihood)):
        if args.section in (name, "all"):
            out[name] = fn(args)
    return out


if __name__ == "__main__":
    main()
