"""Few-step sampling of the shipped digits model: the best fixed time grid against
optimized and learned grids and solver statistics, scored by FD-digits.

The model is ``jdiff.presets.pretrained("digits")`` (class-conditional U-Net, 8x8x1,
VP-cosine), sampled **class-conditionally** (sample ``i`` gets label ``i % 10``, so every
configuration draws the same balanced mix of classes from the same noises; the model was
trained without label dropout, so it has no unconditional mode). A configuration's score
is FD-digits (:func:`jdiff.features.digits.fd_digits`) between its samples and the 1797
real digits.

Samples are drawn in chunks of ``--chunk`` noises (chunk ``k`` holds noises
``k * chunk ... (k + 1) * chunk - 1`` of one fixed seed, the same for every
configuration), so one compiled program per solver serves every grid and every chunk
(:func:`jdiff.sample_padded`). Stages, each resumable (every finished chunk is cached
under ``{out}/cache/``):

- ``screen``: every deterministic solver of the registry x every grid kind of
  :func:`jdiff.time_grid` (uniform, logSNR, quadratic, Karras) at each NFE, scored on the
  first chunk. Solvers that compute exactly the steps of another one
  (``jdiff.solvers._registry.IDENTICAL``) repeat its numbers.
- ``tune``: for the ``--tuned`` best fixed solvers at NFE 5 (by the screen), LD3 (teacher:
  ``jdiff.tune.teacher_solve``, 40 DPM-Solver++(3M) steps, on separate training noises),
  GITS (DDIM one-step costs over a 30-interval logSNR teacher trajectory) and DMN (no
  model calls) grids (:mod:`jdiff.tune`); DPM-Solver-v3 with the model's statistics
  (:func:`jdiff.solvers.model_statistics` over real digits with their labels); DC-Solver
  (:func:`jdiff.solvers.fit_dc_ratios`) on the best multistep solver's best grid. Each
  tuned configuration is scored on the first chunk.
- ``final``: the ``--top`` best fixed configurations of the screen and every tuned
  configuration, rescored on ``--final`` samples (all chunks).
- ``reference``: the same noises and labels solved with many steps (``--reference
  dpm++2m@10 dpm++3m@20``), the model's own FD-digits that few-step samplers approach.
- ``report``: table (markdown), CSV and plot under ``experiments/results/low_nfe_digits/``.
- ``odeerr`` (not in ``all``): the testbeds' measure on this model, the mean L2 per sample
  to the model's own accurate ODE solution (40 DPM-Solver++(3M) steps) from the first
  chunk's noises, for fixed configurations (``--ode-solvers``, ``all`` for the registry),
  the stored tuned grids and LD3 with decoupled network times (``--ode-ld3``); with
  ``--ode-fd``, each side's best is also scored by FD-digits on ``--final`` samples.
  Table: ``odeerr.md``.

    python experiments/low_nfe_digits.py                  # all stages, NFE 5
    python experiments/low_nfe_digits.py --stage screen --nfes 3 4 5 6 8 10
    python experiments/low_nfe_digits.py --stage odeerr --ode-solvers all ipndm3+afs --ld3-iters 150 --ode-fd
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff import solvers as S
from jdiff import tune as T
from jdiff.solvers._registry import IDENTICAL
from jdiff.wrappers import InnerWrapper

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "low_nfe_digits")
MAX_STEPS = 10  # one compiled loop per solver serves every grid of at most this many intervals
SEED = 0  # evaluation noises
TRAIN_SEED = 1  # training noises of the tuned side (disjoint from the evaluation noises)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True, eq=False)
class FixedLabels(InnerWrapper):
    """The digits model with per-sample labels built in, for the library functions that
    call a denoiser without ``cond`` (``model_statistics``, ``fit_dc_ratios``)."""

    inner: Any
    labels: Any

    def __call__(self, x, t, cond=None):
        return self.inner(x, t, self.labels)


jax.tree_util.register_dataclass(FixedLabels, data_fields=["inner", "labels"], meta_fields=[])


class Context:
    """The model, the noises, the real digits' feature statistics and the chunk cache."""

    def __init__(self, out, chunk):
        from jdiff.data import digits
        from jdiff.features.digits import digits_classifier
        from jdiff.presets import pretrained

        self.out, self.chunk = out, int(chunk)
        self.den, cfg = pretrained("digits")
        self.shape = tuple(cfg.data.shape)
        self.proc = self.den.process
        self.real, self.real_labels = digits()
        self.clf = digits_classifier()
        self.real_stats = self.clf.stats(self.real)
        os.makedirs(os.path.join(out, "cache"), exist_ok=True)

    def noises(self, k):
        """Chunk ``k`` of the evaluation noises and its labels."""
        x = self.proc.prior_sample(jax.random.key(SEED), ((k + 1) * self.chunk, *self.shape))[k * self.chunk :]
        lab = jnp.arange(k * self.chunk, (k + 1) * self.chunk, dtype=jnp.int32) % 10
        return x, lab

    def samples(self, key, solver, grid, nfe, chunks, denoiser=None):
        """Samples of ``chunks`` chunks (cached as ``cache/{key}-{k}.npy``), or None when the
        solver cannot run this NFE on this grid."""
        den = self.den if denoiser is None else denoiser
        out = []
        for k in range(chunks):
            path = os.path.join(self.out, "cache", f"{key}-{k}.npy")
            if os.path.exists(path):
                out.append(np.load(path))
                continue
            x, lab = self.noises(k)
            y, used = jdiff.sample_padded(
                solver,
                den,
                x,
                jnp.asarray(grid, jnp.float32),
                max_steps=max(MAX_STEPS, len(grid) - 1),
                nfe=T._nfe_arg(solver, nfe),
                cond=lab,
                return_nfe=True,
            )
            if int(used) > nfe:
                return None
            y = np.asarray(y, np.float32)
            np.save(path, y)
            out.append(y)
        return np.concatenate(out)

    def score(self, x):
        from jdiff.metrics import frechet_distance

        n = len(x)
        lab = np.arange(n) % 10
        if not np.all(np.isfinite(x)):
            return dict(fd=float("nan"), acc=float("nan"), n=n)
        fd = frechet_distance(*self.clf.stats(x), *self.real_stats)
        return dict(fd=float(fd), acc=float(self.clf.accuracy(x, lab)), n=n)


def cell_key(side, method, solver, nfe):
    safe = "".join(c if c.isalnum() or c in "+-." else "_" for c in solver)
    return f"{side}-{method}-{safe}-{nfe}"


def read_rows(out):
    path = os.path.join(out, "cells.jsonl")
    if not os.path.exists(path):
        return []
    rows = {}
    with open(path) as f:  # a cell scored twice (two stages running at once) counts once
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[(r["side"], r["method"], r["solver"], r["nfe"], r["n"])] = r
    return list(rows.values())


def add_row(out, row):
    with open(os.path.join(out, "cells.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


# screened first (a slow machine may stop the screen early: the likely best come first)
FIRST = ["dpm++2m", "unipc2", "ipndm3", "dpm++3m", "unipc3", "ipndm4", "deis3", "dpm++3m(variant=diffusers)", "ipndm2"]


def deterministic_names():
    return [n for n in S.names() if not S.get(n).stochastic]


# --------------------------------------------------------------------------- screen
def screen(ctx, nfes, names=None):
    done = {(r["side"], r["method"], r["solver"], r["nfe"], r["n"]) for r in read_rows(ctx.out)}
    run = [n for n in (names or deterministic_names()) if n not in IDENTICAL]
    run.sort(key=lambda n: FIRST.index(n) if n in FIRST else len(FIRST))  # stable: then the registry's order
    for name in run:
        s = S.get(name)
        t0 = time.perf_counter()
        for nfe in nfes:
            for kind in jdiff.GRID_KINDS:
                if ("fixed", kind, name, nfe, ctx.chunk) in done:
                    continue
                try:
                    grid = jdiff.time_grid(ctx.proc, kind=kind, nfe=nfe, solver=s)
                except ValueError:
                    continue
                if len(grid) - 1 < s.min_steps or len(grid) - 1 > MAX_STEPS:
                    continue
                x = ctx.samples(cell_key("fixed", kind, name, nfe), s, grid, nfe, 1)
                if x is None:
                    continue
                row = dict(side="fixed", method=kind, solver=name, nfe=nfe, **ctx.score(x))
                row["grid"] = [float(v) for v in np.asarray(grid)]
                add_row(ctx.out, row)
        log(f"screen {name}: {time.perf_counter() - t0:.0f} s")


def with_aliases(rows):
    """Rows of the IDENTICAL solvers, copied from their targets' fixed rows."""
    out = list(rows)
    for alias, target in IDENTICAL.items():
        out += [dict(r, solver=alias, same_as=target) for r in rows if r["side"] == "fixed" and r["solver"] == target]
    return out


def best_fixed(rows, nfe, n):
    cand = [r for r in rows if r["side"] == "fixed" and r["nfe"] == nfe and r["n"] == n and np.isfinite(r["fd"])]
    return sorted(cand, key=lambda r: r["fd"])


# ----------------------------------------------------------------------------- tune
def fit_ld3(ctx, args, s, x_tr, y_tr, lab_tr, nfe, init, decouple=0.0):
    """LD3 (:func:`jdiff.tune.ld3`) for solver ``s`` at ``nfe`` from the grid ``init``, on
    the training noises ``x_tr`` (labels ``lab_tr``) and their teacher solutions ``y_tr``;
    ``decouple`` also learns network times."""
    return T.ld3(
        s,
        ctx.den,
        x_tr,
        y_tr,
        nfe,
        init=init,
        iters=args.ld3_iters,
        learning_rate=args.ld3_lr,
        batch_size=args.ld3_batch,
        decouple=decouple,
        cond=lab_tr,
    )


def tune(ctx, args):
    nfe = 5
    if args.tuned_solvers:  # score their fixed cells first (shared with the screen through the cache)
        screen(ctx, [nfe], args.tuned_solvers)
    rows = read_rows(ctx.out)
    done = {(r["side"], r["method"], r["solver"], r["nfe"]) for r in rows if r["n"] == ctx.chunk}
    ranked = best_fixed(rows, nfe, ctx.chunk)
    if not ranked:
        raise SystemExit("run --stage screen first")
    solvers, kinds = [], {}
    for r in ranked:  # the best few distinct solvers, each with its best grid kind
        if r["solver"] not in kinds:
            kinds[r["solver"]] = r["method"]
            solvers.append(r["solver"])
    solvers = list(args.tuned_solvers) if args.tuned_solvers else solvers[: args.tuned]
    log(f"tuned solvers: {[(s, kinds[s]) for s in solvers]}")

    def evaluate(method, name, solver, grid, extra=None, denoiser=None):
        if ("tuned", method, name, nfe) in done:
            return
        x = ctx.samples(cell_key("tuned", method, name, nfe), solver, grid, nfe, 1, denoiser)
        row = dict(side="tuned", method=method, solver=name, nfe=nfe, **ctx.score(x))
        row["grid"] = [float(v) for v in np.asarray(grid)]
        row.update(extra or {})
        add_row(ctx.out, row)
        log(f"  {name} {method}: FD-digits {row['fd']:.4f}")

    # training noises and the teacher (LD3, DC)
    ntr = int(args.train)
    x_tr = ctx.proc.prior_sample(jax.random.key(TRAIN_SEED), (ntr, *ctx.shape))
    lab_tr = jnp.arange(ntr, dtype=jnp.int32) % 10
    need_teacher = any(("tuned", m, s, nfe) not in done for s in solvers for m in ("ld3", "dc") if m in args.methods)
    if need_teacher:
        t0 = time.perf_counter()
        y_tr = T.teacher_solve(ctx.den, x_tr, steps=40, cond=lab_tr)
        log(f"teacher: {time.perf_counter() - t0:.0f} s")

    # LD3, started from the solver's best fixed grid
    for name in solvers:
        if ("tuned", "ld3", name, nfe) in done or "ld3" not in args.methods:
            continue
        s = S.get(name)
        init = np.asarray(jdiff.time_grid(ctx.proc, kind=kinds[name], nfe=nfe, solver=s), np.float64)
        t0 = time.perf_counter()
        fit = fit_ld3(ctx, args, s, x_tr, y_tr, lab_tr, nfe, init)
        secs = time.perf_counter() - t0
        log(f"ld3 {name}: {secs:.0f} s, loss {fit.history[0]:.4g} -> {min(fit.history):.4g}")
        evaluate("ld3", name, s, fit.grid, dict(fit_seconds=round(secs, 1)))

    # DMN: no model calls
    for name in solvers:
        s = S.get(name)
        if ("tuned", "dmn", name, nfe) in done or "dmn" not in args.methods:
            continue
        fit = T.dmn(ctx.proc, s.num_steps(nfe), order=min(s.order, 3))
        evaluate("dmn", name, s, fit.grid, dict(fit_seconds=round(fit.seconds, 1)))

    # DPM-Solver-v3 with the model's statistics (real digits with their labels)
    stats_path = os.path.join(ctx.out, "v3_statistics.npz")
    v3_todo = [
        (o, k) for o in (2, 3) for k in ("logsnr", "quadratic") if ("tuned", f"v3-{k}", f"dpm-v3-{o}", nfe) not in done
    ]
    if "v3" in args.methods and v3_todo:
        if os.path.exists(stats_path):
            stats = S.load_statistics(stats_path, process=ctx.proc, shape=ctx.shape, model="digits")
        else:
            idx = np.random.default_rng(0).permutation(len(ctx.real))[: args.v3_data]
            t0 = time.perf_counter()
            stats = S.model_statistics(
                FixedLabels(ctx.den, jnp.asarray(ctx.real_labels[idx], jnp.int32)),
                jnp.asarray(ctx.real[idx]),
                key=jax.random.key(2),
                num_lambdas=args.v3_lambdas,
                model="digits",
            )
            log(f"v3 statistics: {time.perf_counter() - t0:.0f} s")
            stats.save(stats_path)
        for order, kind in v3_todo[: args.v3_configs]:
            s = S.dpm_solver_v3(stats, order)
            grid = jdiff.time_grid(ctx.proc, kind=kind, nfe=nfe, solver=s)
            evaluate(f"v3-{kind}", f"dpm-v3-{order}", s, grid, dict(order=order))

    # DC-Solver on the best multistep solver's best fixed grid
    from jdiff.solvers._multistep import Multistep

    base_name = next(n for n in [r["solver"] for r in ranked] if isinstance(S.get(n), Multistep))
    if ("tuned", "dc", base_name + "-dc", nfe) not in done and "dc" in args.methods:
        base = S.get(base_name)
        grid = jdiff.time_grid(ctx.proc, kind=kinds[base_name], nfe=nfe, solver=base)
        m = args.dc_noises
        t0 = time.perf_counter()
        dc = S.fit_dc_ratios(base, FixedLabels(ctx.den, lab_tr[:m]), x_tr[:m], grid, y_tr[:m], iterations=args.dc_iters)
        secs = time.perf_counter() - t0
        log(f"dc {base_name}: {secs:.0f} s, ratios {dc.ratios}")
        extra = dict(base=base_name, fit_seconds=round(secs, 1), grid_kind=kinds[base_name], ratios=list(dc.ratios))
        evaluate("dc", base_name + "-dc", dc, grid, extra)

    # GITS: one cost matrix (DDIM one-step errors on a teacher trajectory) serves every solver of N steps
    if "gits" in args.methods and any(("tuned", "gits", n, nfe) not in done for n in solvers):
        fit = T.gits(
            S.ddim(), ctx.den, x_tr[: args.gits_noises], nfe, fine_steps=args.gits_fine, cond=lab_tr[: args.gits_noises]
        )
        log(f"gits: {fit.seconds:.0f} s")
        for name in solvers:
            s = S.get(name)
            if s.num_steps(nfe) == len(fit.grid) - 1:
                evaluate("gits", name, s, fit.grid, dict(fit_seconds=round(fit.seconds, 1)))


# ------------------------------------------------------------------------ reference
def reference(ctx, args):
    """The model's own FD-digits floor: the same noises and labels solved with many steps
    (the ODE solution every few-step sampler approximates), on all ``--final`` samples."""
    chunks = -(-int(args.final) // ctx.chunk)
    done = {(r["solver"], r["nfe"]) for r in read_rows(ctx.out) if r["side"] == "reference"}
    for name, nfe in ((n, int(v)) for n, v in (c.split("@") for c in args.reference)):
        if (name, nfe) in done:
            continue
        t0 = time.perf_counter()
        s = S.get(name)
        grid = jdiff.time_grid(ctx.proc, kind="logsnr", nfe=nfe, solver=s)
        x = ctx.samples(cell_key("reference", "logsnr", name, nfe), s, grid, nfe, chunks)
        row = dict(side="reference", method="logsnr", solver=name, nfe=nfe, **ctx.score(x))
        add_row(ctx.out, row)
        log(f"reference {name} nfe {nfe}: FD-digits {row['fd']:.4f} ({time.perf_counter() - t0:.0f} s)")


# ---------------------------------------------------------------------------- final
def solver_of(ctx, row):
    """The solver value a stored row was scored with."""
    if row["method"] == "dc":
        return S.dc_solver(S.get(row["base"]), row["ratios"])
    if row["method"].startswith("v3-"):
        stats = S.load_statistics(os.path.join(ctx.out, "v3_statistics.npz"), process=ctx.proc, shape=ctx.shape)
        return S.dpm_solver_v3(stats, int(row["order"]))
    return S.get(row["solver"])


def final(ctx, args, nfes):
    rows = read_rows(ctx.out)
    n = int(args.final)
    chunks = -(-n // ctx.chunk)
    done = {(r["side"], r["method"], r["solver"], r["nfe"]) for r in rows if r["n"] == chunks * ctx.chunk}
    todo = []
    for nfe in nfes:
        todo += best_fixed(rows, nfe, ctx.chunk)[: args.top]
        todo += [r for r in rows if r["side"] == "tuned" and r["nfe"] == nfe and r["n"] == ctx.chunk]
    for r in todo:
        if (r["side"], r["method"], r["solver"], r["nfe"]) in done:
            continue
        t0 = time.perf_counter()
        s = solver_of(ctx, r)
        x = ctx.samples(cell_key(r["side"], r["method"], r["solver"], r["nfe"]), s, r["grid"], r["nfe"], chunks)
        new = dict(r, **ctx.score(x))
        add_row(ctx.out, new)
        log(
            f"final {r['side']} {r['solver']} {r['method']} nfe {r['nfe']}: FD-digits {new['fd']:.4f} "
            f"(screen {r['fd']:.4f}, {time.perf_counter() - t0:.0f} s)"
        )


# --------------------------------------------------------------------------- odeerr
ODE_SOLVERS = ["ipndm3+afs", "unipc3", "ipndm3", "unipc2", "dpm++3m", "dpm++2m", "ipndm4"]


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def odeerr(ctx, args):
    """The ODE error at NFE 5, the testbeds' measure: mean L2 (per sample) between each
    configuration's samples and the model's own accurate ODE solution
    (:func:`jdiff.tune.teacher_solve`, ``--ode-teacher`` DPM-Solver++(3M) steps) from the
    same first chunk of evaluation noises and labels. Fixed side: ``--ode-solvers`` (registry
    names, or ``NAME+afs``) x every grid kind; tuned side: the stored tuned cells of the
    ``tune`` stage (LD3, DMN grids) and LD3 with decoupled network times (``--ode-ld3``,
    ``--decouple``; :func:`jdiff.wrappers.network_time`) on the training noises of
    ``tune``. Rows go to ``{out}/odeerr.jsonl``."""
    from low_nfe import solver_of as spec_solver  # NAME or NAME+afs

    nfe = 5
    path = os.path.join(ctx.out, "odeerr.jsonl")
    done = {(r["side"], r["method"], r["solver"]) for r in read_jsonl(path)}
    x, lab = ctx.noises(0)
    tpath = os.path.join(ctx.out, "cache", f"teacher-{args.ode_teacher}-0.npy")
    if os.path.exists(tpath):
        ref = np.load(tpath)
    else:
        t0 = time.perf_counter()
        ref = np.asarray(T.teacher_solve(ctx.den, x, steps=args.ode_teacher, cond=lab), np.float32)
        np.save(tpath, ref)
        log(f"odeerr teacher ({args.ode_teacher} steps, {len(ref)} noises): {time.perf_counter() - t0:.0f} s")

    def err(y):
        return float(np.mean(np.sqrt(np.sum((y - ref).reshape(len(ref), -1) ** 2, -1))))

    def add(row):
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        done.add((row["side"], row["method"], row["solver"]))
        log(f"odeerr {row['side']} {row['solver']} {row['method']}: {row['err']:.4f}")

    names = list(args.ode_solvers)
    if "all" in names:  # every deterministic registry solver (IDENTICAL ones repeat their target's steps)
        names = [n for n in names if n != "all"] + [n for n in deterministic_names() if n not in IDENTICAL]
    for name in dict.fromkeys(names):
        s = spec_solver(name)
        t0 = time.perf_counter()
        for kind in jdiff.GRID_KINDS:
            if ("fixed", kind, name) in done:
                continue
            try:
                grid = jdiff.time_grid(ctx.proc, kind=kind, nfe=nfe, solver=s)
            except ValueError:
                continue
            y = ctx.samples(cell_key("fixed", kind, name, nfe), s, grid, nfe, 1)
            if y is not None:
                add(dict(side="fixed", method=kind, solver=name, nfe=nfe, n=len(y), err=err(y)))
        log(f"odeerr fixed {name}: {time.perf_counter() - t0:.0f} s")

    stored = [r for r in read_rows(ctx.out) if r["side"] == "tuned" and r["nfe"] == nfe and r["n"] == ctx.chunk]
    for r in stored:
        if (r["side"], r["method"], r["solver"]) in done or not r["method"].startswith(("ld3", "dmn", "v3-")):
            continue
        y = ctx.samples(cell_key("tuned", r["method"], r["solver"], nfe), solver_of(ctx, r), r["grid"], nfe, 1)
        extra = {"order": r["order"]} if "order" in r else {}  # v3 rows: solver_of needs it
        add(
            dict(
                side="tuned",
                method=r["method"],
                solver=r["solver"],
                nfe=nfe,
                n=len(y),
                err=err(y),
                grid=r["grid"],
                **extra,
            )
        )

    method = f"ld3-dec@{args.ld3_iters}"  # tagged with its Adam steps: fits of several lengths are kept
    todo = [n for n in args.ode_ld3 if ("tuned", method, n) not in done]
    if todo:
        ld3_dec(ctx, args, method, todo, path, err, add, spec_solver)
    if args.ode_fd:
        odeerr_fd(ctx, args, path, spec_solver)


def ld3_dec(ctx, args, method, todo, path, err, add, spec_solver):
    """LD3 with decoupled network times for the solvers ``todo`` (the odeerr stage)."""
    nfe = 5
    ntr = int(args.train)
    x_tr = ctx.proc.prior_sample(jax.random.key(TRAIN_SEED), (ntr, *ctx.shape))
    lab_tr = jnp.arange(ntr, dtype=jnp.int32) % 10
    t0 = time.perf_counter()
    y_tr = T.teacher_solve(ctx.den, x_tr, steps=args.ode_teacher, cond=lab_tr)
    log(f"odeerr training teacher: {time.perf_counter() - t0:.0f} s")
    fixed = [r for r in read_jsonl(path) if r["side"] == "fixed"]
    for name in todo:
        s = spec_solver(name)
        mine = [r for r in fixed if r["solver"] == name]
        kind = min(mine, key=lambda r: r["err"])["method"] if mine else "logsnr"
        init = np.asarray(jdiff.time_grid(ctx.proc, kind=kind, nfe=nfe, solver=s), np.float64)
        t0 = time.perf_counter()
        fit = fit_ld3(ctx, args, s, x_tr, y_tr, lab_tr, nfe, init, decouple=args.decouple)
        secs = time.perf_counter() - t0
        log(f"odeerr {method} {name}: {secs:.0f} s, loss {fit.history[0]:.4g} -> {min(fit.history):.4g}")
        y = ctx.samples(cell_key("tuned", method, name, nfe), s, fit.grid, nfe, 1, fit.denoiser(ctx.den))
        add(
            dict(
                side="tuned",
                method=method,
                solver=name,
                nfe=nfe,
                n=len(y),
                err=err(y),
                init=kind,
                iters=args.ld3_iters,
                fit_seconds=round(secs, 1),
                loss=[fit.history[0], min(fit.history)],
                grid=[float(v) for v in fit.grid],
                net_grid=[float(v) for v in fit.net_grid],
                fd_200=ctx.score(y)["fd"],
            )
        )


def odeerr_fd(ctx, args, path, spec_solver):
    """FD-digits on ``--final`` samples of the configuration with the lowest ODE error of
    each side (rows ``fd`` in ``{out}/odeerr.jsonl``)."""
    from jdiff.wrappers import network_time

    nfe = 5
    rows = read_jsonl(path)
    chunks = -(-int(args.final) // ctx.chunk)
    scored = {(r["side"], r["method"], r["solver"]) for r in rows if r["side"].endswith("-fd")}
    for side in ("fixed", "tuned"):
        mine = [r for r in rows if r["side"] == side]
        if not mine:
            continue
        b = min(mine, key=lambda r: r["err"])
        if (side + "-fd", b["method"], b["solver"]) in scored:
            continue
        s = solver_of(ctx, b) if b["method"].startswith("v3-") else spec_solver(b["solver"])
        grid = b.get("grid") or jdiff.time_grid(ctx.proc, kind=b["method"], nfe=nfe, solver=s)
        den = ctx.den
        if b.get("net_grid"):
            den = network_time(ctx.den, jnp.asarray(grid, jnp.float32), jnp.asarray(b["net_grid"], jnp.float32))
        t0 = time.perf_counter()
        y = ctx.samples(cell_key(side, b["method"], b["solver"], nfe), s, grid, nfe, chunks, den)
        row = dict(side=side + "-fd", method=b["method"], solver=b["solver"], nfe=nfe, err=b["err"], **ctx.score(y))
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"odeerr FD-digits {side} {b['solver']} {b['method']}: {row['fd']:.4f} ({time.perf_counter() - t0:.0f} s)")


def odeerr_report(out):
    rows = read_jsonl(os.path.join(out, "odeerr.jsonl"))
    if not rows:
        return
    fixed = sorted((r for r in rows if r["side"] == "fixed"), key=lambda r: r["err"])
    tuned = sorted((r for r in rows if r["side"] == "tuned"), key=lambda r: r["err"])
    fd = {(r["side"][:-3], r["method"], r["solver"]): r for r in rows if r["side"].endswith("-fd")}
    lines = [
        "| side | solver | grid / method | ODE error (mean L2, 200) | FD-digits (1000) |",
        "|---|---|---|---:|---:|",
    ]
    for r in tuned + fixed:
        f = fd.get((r["side"], r["method"], r["solver"]))
        lines.append(
            f"| {r['side']} | {r['solver']} | {r['method']} | {r['err']:.4f} | {f['fd']:.4f} |"
            if f
            else f"| {r['side']} | {r['solver']} | {r['method']} | {r['err']:.4f} | |"
        )
    if fixed and tuned:
        b, t = fixed[0], tuned[0]
        lines += [
            "",
            f"Best tuned / best fixed ODE error at NFE 5: {t['err']:.4f} / {b['err']:.4f} = {t['err'] / b['err']:.2f} "
            f"({t['solver']} {t['method']} vs {b['solver']} {b['method']}).",
        ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "odeerr.md"), "w") as f:
        f.write(text)
    print(text)


# --------------------------------------------------------------------------- report
COLS = ["side", "method", "solver", "nfe", "n", "fd", "acc", "fit_seconds", "same_as", "base", "grid"]


def report(out, args, nfes, meta):
    rows = with_aliases(read_rows(out))
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (" ".join(f"{v:.5g}" for v in r.get(k, [])) if k == "grid" else r.get(k, "")) for k in COLS})
    n_final = -(-int(args.final) // args.chunk) * args.chunk
    lines = [f"FD-digits against the 1797 real digits ({meta}).", ""]
    summary = []
    for nfe in nfes:
        fin = [r for r in rows if r["nfe"] == nfe and r["n"] == n_final and not r.get("same_as")]
        fixed = sorted((r for r in fin if r["side"] == "fixed"), key=lambda r: r["fd"])
        tuned = sorted((r for r in fin if r["side"] == "tuned"), key=lambda r: r["fd"])
        if not fixed:
            continue
        if not tuned:  # no tuned configuration reached the final sample count
            tuned = [dict(solver="(none)", method="-", fd=float("nan"), acc=float("nan"), side="tuned")]
        ratio = tuned[0]["fd"] / fixed[0]["fd"]
        summary.append((nfe, fixed[0], tuned[0], ratio))
        lines += [
            f"#### NFE {nfe}, {n_final} samples: the {len(fixed)} best fixed configurations of the screen and "
            "every tuned one",
            "",
            "| side | solver | grid / method | FD-digits | class accuracy | fit s |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r in fixed + tuned:
            lines.append(
                f"| {r['side']} | {r['solver']} | {r['method']} | {r['fd']:.4f} | {100 * r['acc']:.1f}% | "
                f"{r.get('fit_seconds', '')} |"
            )
        for r in sorted((r for r in rows if r["side"] == "reference" and r["n"] == n_final), key=lambda r: r["nfe"]):
            lines.append(
                f"| reference (NFE {r['nfe']}) | {r['solver']} | {r['method']} | {r['fd']:.4f} | "
                f"{100 * r['acc']:.1f}% | |"
            )
        lines += [
            "",
            f"**Best tuned / best fixed at NFE {nfe}: {tuned[0]['fd']:.4f} / {fixed[0]['fd']:.4f} = {ratio:.2f}** "
            f"({tuned[0]['solver']} {tuned[0]['method']} vs {fixed[0]['solver']} {fixed[0]['method']}).",
            "",
        ]
    for nfe in nfes:
        scr = [r for r in rows if r["nfe"] == nfe and r["n"] == args.chunk and r["side"] == "fixed"]
        if not scr:
            continue
        lines += [
            f"#### Screen at NFE {nfe} ({args.chunk} samples): best solver per grid kind, and the 8 best cells "
            f"of {len(scr)} (aliases included)",
            "",
            "| grid | best solver | FD-digits |",
            "|---|---|---:|",
        ]
        for kind in jdiff.GRID_KINDS:
            k = [r for r in scr if r["method"] == kind and np.isfinite(r["fd"])]
            if k:
                b = min(k, key=lambda r: r["fd"])
                lines.append(f"| {kind} | {b['solver']} | {b['fd']:.4f} |")
        lines += ["", "| rank | solver | grid | FD-digits |", "|---:|---|---|---:|"]
        for i, r in enumerate(sorted((r for r in scr if np.isfinite(r["fd"])), key=lambda r: r["fd"])[:8]):
            lines.append(f"| {i + 1} | {r['solver']} | {r['method']} | {r['fd']:.4f} |")
        tun = [r for r in rows if r["nfe"] == nfe and r["n"] == args.chunk and r["side"] == "tuned"]
        if tun:
            lines += [
                "",
                "Tuned configurations on the same samples:",
                "",
                "| solver | method | FD-digits |",
                "|---|---|---:|",
            ]
            for r in sorted(tun, key=lambda r: r["fd"]):
                lines.append(f"| {r['solver']} | {r['method']} | {r['fd']:.4f} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    plot(rows, nfes, args, n_final, os.path.join(out, "low_nfe_digits.png"))
    return summary


def plot(rows, nfes, args, n_final, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for kind in jdiff.GRID_KINDS:
        pts = []
        for nfe in nfes:
            k = [
                r["fd"]
                for r in rows
                if r["side"] == "fixed"
                and r["method"] == kind
                and r["nfe"] == nfe
                and r["n"] == args.chunk
                and np.isfinite(r["fd"])
            ]
            if k:
                pts.append((nfe, min(k)))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"best fixed, {kind}")
    for m in sorted({r["method"] for r in rows if r["side"] == "tuned"}):
        pts = [(r["nfe"], r["fd"]) for r in rows if r["method"] == m and r["n"] == args.chunk]
        if pts:
            best = {}
            for n, v in pts:
                best[n] = min(v, best.get(n, np.inf))
            ax.scatter(list(best), list(best.values()), marker="x", label=f"best {m}", zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(f"FD-digits ({args.chunk} samples)")
    ax.set_title("screen")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[1]
    fin = sorted(
        (r for r in rows if r["nfe"] == 5 and r["n"] == n_final and not r.get("same_as")), key=lambda r: -r["fd"]
    )
    ax.barh(range(len(fin)), [r["fd"] for r in fin], color=["C0" if r["side"] == "fixed" else "C3" for r in fin])
    ax.set_yticks(range(len(fin)), [f"{r['solver']} {r['method']}" for r in fin], fontsize=7)
    ax.set_xlabel(f"FD-digits ({n_final} samples)")
    ax.set_title("NFE 5: best fixed (blue) vs tuned (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--stage", default="all", choices=["screen", "tune", "final", "reference", "odeerr", "report", "all"]
    )
    ap.add_argument("--reference", nargs="*", default=["dpm++2m@10", "dpm++3m@20"], help="solver@nfe floors")
    ap.add_argument("--nfes", nargs="*", type=int, default=[5])
    ap.add_argument("--chunk", type=int, default=200, help="samples per chunk (the screen's sample count)")
    ap.add_argument("--final", type=int, default=1000, help="samples of the final comparison")
    ap.add_argument("--top", type=int, default=6, help="best fixed configurations rescored in the final stage")
    ap.add_argument("--tuned", type=int, default=3, help="best fixed solvers that get tuned grids")
    ap.add_argument("--tuned-solvers", nargs="*", default=None, help="tune these instead of the screen's best")
    ap.add_argument("--methods", nargs="*", default=["ld3", "dmn", "v3", "dc", "gits"], help="tuned methods to run")
    ap.add_argument(
        "--v3-configs", type=int, default=4, help="v3 (order, grid) pairs to score: (2|3) x (logsnr|quadratic)"
    )
    ap.add_argument("--train", type=int, default=64, help="training noises (LD3, DC)")
    ap.add_argument("--ld3-iters", type=int, default=60)
    ap.add_argument("--ld3-lr", type=float, default=0.05)
    ap.add_argument("--ld3-batch", type=int, default=32)
    ap.add_argument("--gits-fine", type=int, default=30)
    ap.add_argument("--gits-noises", type=int, default=16)
    ap.add_argument("--v3-data", type=int, default=200, help="real digits for the v3 statistics")
    ap.add_argument("--v3-lambdas", type=int, default=101, help="log-SNR points (13 diverge at NFE 5)")
    ap.add_argument("--dc-noises", type=int, default=16)
    ap.add_argument("--dc-iters", type=int, default=60)
    ap.add_argument("--ode-teacher", type=int, default=40, help="odeerr: DPM-Solver++(3M) steps of the reference")
    ap.add_argument(
        "--ode-solvers",
        nargs="*",
        default=ODE_SOLVERS,
        help="odeerr: fixed side (NAME, NAME+afs, or all: the deterministic registry)",
    )
    ap.add_argument("--ode-ld3", nargs="*", default=["ipndm3+afs", "unipc3"], help="odeerr: LD3 with network times")
    ap.add_argument("--decouple", type=float, default=0.5, help="odeerr: LD3's network-time window")
    ap.add_argument("--ode-fd", action="store_true", help="odeerr: FD-digits (--final samples) of each side's best")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    stages = ["screen", "tune", "final", "reference", "report"] if args.stage == "all" else [args.stage]
    ctx = None if stages == ["report"] else Context(args.out, args.chunk)
    for st in stages:
        t0 = time.perf_counter()
        if st == "screen":
            screen(ctx, args.nfes)
        elif st == "tune":
            tune(ctx, args)
        elif st == "final":
            final(ctx, args, [5])
        elif st == "reference":
            reference(ctx, args)
        elif st == "odeerr":
            odeerr(ctx, args)
            odeerr_report(args.out)
        else:
            meta = (
                f"{jax.default_backend()}, JAX {jax.__version__}, {time.strftime('%Y-%m-%d')}, "
                f"load average {os.getloadavg()[0]:.1f}"
            )
            report(args.out, args, args.nfes, meta)
        log(f"stage {st}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
