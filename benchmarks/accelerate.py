"""Faster sampling without retraining (issue 25): every acceleration method of
``jdiff.accelerate`` on the digits U-Net and the digits DiT, against the plain sampler.

    python benchmarks/accelerate.py                                  # everything, 1,000 samples, NFE 10/20/50
    python benchmarks/accelerate.py --num 100 --nfes 10 --methods dev-count,dev-reuse2   # a quick check
    python benchmarks/accelerate.py --models dit --nfes 50 --resume  # one model; keep groups already measured

Per model and NFE (a *group*) the plain sampler (``--solver``, DPM-Solver++(2M) by default)
and every method row for that model draw the same ``--num`` class-conditional samples
(labels 0..9 cycling, prior noise of ``jdiff.generate`` with ``--seed``: the plain rows are
``scripts/check_pretrained_digits.py``'s samples) in chunks of ``--batch``. Every program is
compiled on its first chunk; the other chunks run interleaved (plain, method 1, method 2,
plain, ...) so all programs see the same machine load, and each is timed per chunk with
``block_until_ready``. Reported per row:

- ``speedup``: the plain sampler's best chunk time over the method's (same batch, same
  solver, same NFE, same run): > 1 is faster. ``ms/sample`` is the best chunk time per sample.
- ``calls``: network evaluations per sample (a batched classifier-free-guidance call counts
  2, as ``jdiff.SampleInfo.nfe``); ``full``: the carried methods' full calls (the others
  reuse or forecast the deep features, or exit early).
- ``MFLOP``: model FLOPs per sample from XLA's cost analysis
  (``compiled.cost_analysis()["flops"]``) of one full network call and of the parts a
  method runs instead (``jdiff.models.internals``: front + back at the method's cut for a
  cached call; embedding, head and one block for early exit; the small model's call for
  T-Stitch), combined with the counts the method reports. The whole compiled sampler's
  cost analysis is not used: XLA counts a ``lax.scan`` body once, not once per step.
- ``FD``: FD-digits of the ``--num`` samples against the 450 held-out digits (the digits
  classifier's features, as ``jdiff bench``); ``dFD``: the change from the plain sampler's;
  the plain row's ``+-`` is the spread: the standard deviation of FD over ``--boot``
  bootstrap resamples of the plain samples (and, with ``--draws K``, over K disjoint-seed
  draws of ``--num`` samples). ``L2``: the mean over samples of the L2 distance to the plain
  sampler's output from the same noise.

Rows whose method is not importable on this branch (or whose model is not shipped) are
skipped with a note. Written: ``OUT/accelerate.csv`` (every row), ``OUT/table.md`` (the
table, machine and date, the notes and the issue's checks) and the same on stdout.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from jdiff._xla import prefer_fast_cpu_compile

prefer_fast_cpu_compile()  # XLA's loop emitters: about 2x less compile time on CPU (jdiff/_xla.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jdiff  # noqa: E402
import jdiff.accelerate as A  # noqa: E402
from jdiff import models as M  # noqa: E402
from jdiff._random import per_sample_keys  # noqa: E402
from jdiff.features.digits import digits_classifier, digits_split  # noqa: E402
from jdiff.metrics import frechet_distance, gaussian_stats  # noqa: E402
from jdiff.runs import pretrained  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import machine, table, today  # noqa: E402

COLUMNS = [
    "model", "nfe", "method", "family", "batch", "ms_per_sample", "speedup", "calls", "full_calls",
    "mflop", "flop_ratio", "fd", "d_fd", "fd_spread", "accuracy", "l2_to_plain", "compile_s", "note", "model_note",
]  # fmt: skip
DIGITS_DIT = dict(patch_size=2, hidden_dim=128, depth=6, num_heads=4, mlp_ratio=4.0, time_scale=1000.0)


class Skip(Exception):
    """A row that cannot run here (its method or model is missing): the message says why."""


# --------------------------------------------------------------------------- models


@dataclasses.dataclass
class Model:
    """A benchmarked denoiser: ``den`` (maybe a guidance wrapper around ``net_den``)."""

    name: str
    den: Any
    net_den: Any  # the jdiff.Denoiser of the network itself
    shape: tuple
    note: str = ""
    _flops: dict = dataclasses.field(default_factory=dict)


def _randomized(model, like):
    """``model`` with every parameter perturbed (the zero-initialized output layers would
    make it the zero function), as a denoiser of ``like``'s process, prediction and time
    input: a stand-in for a model that is not shipped on this branch."""
    st = nnx.state(model)
    leaves, tdef = jax.tree.flatten(st)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [a + 0.02 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(tdef, noisy))
    apply, params = M.functional(model)
    return dataclasses.replace(like, apply_fn=apply, params=params)


def _shipped(name: str, preset: str, dev: bool) -> Model:
    """The shipped model ``preset`` (``digits_dit``, ``digits_small``), or with ``dev`` a
    random-weight stand-in of its configuration."""
    try:
        den, cfg = pretrained(preset)
        return Model(name, den, den, tuple(cfg.data.shape), f"pretrained({preset!r})")
    except ValueError as e:
        if not dev:
            raise Skip(f"pretrained({preset!r}) is not on this branch ({e}); --dev-models: random weights") from None
    unet, cfg = pretrained("digits")
    if preset == "digits_dit":
        model = M.DiT(M.DiTConfig(image_size=8, in_channels=1, num_classes=10, **DIGITS_DIT), rngs=nnx.Rngs(0))
    else:
        model = M.UNet(dataclasses.replace(cfg.model.unet, base_channels=16, num_groups=8), rngs=nnx.Rngs(0))
    den = _randomized(model, unet)
    note = f"RANDOM-WEIGHT stand-in of the {preset} config (pretrained({preset!r}) is not on this branch)"
    return Model(name, den, den, tuple(cfg.data.shape), note)


def load_model(name: str, *, cfg_scale: float, dev: bool) -> Model:
    """``unet`` (the shipped digits U-Net), ``unet-cfg`` (the same under classifier-free
    guidance), ``dit`` (the digits DiT), ``unet-small`` (T-Stitch's small digits U-Net)."""
    if name == "unet":
        den, cfg = pretrained("digits")
        return Model(name, den, den, tuple(cfg.data.shape), "pretrained('digits')")
    if name == "unet-cfg":
        den, cfg = pretrained("digits", guidance=cfg_scale)
        return Model(name, den, den.inner, tuple(cfg.data.shape), f"pretrained('digits', guidance={cfg_scale:g})")
    if name == "dit":
        return _shipped(name, "digits_dit", dev)
    if name == "unet-small":
        return _shipped(name, "digits_small", dev)
    raise ValueError(f"unknown model {name!r}: unet, unet-cfg, dit")


def _cost(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def model_flops(model: Model, key, batch: int = 8) -> float:
    """Per-sample FLOPs of one network call, or of one of its parts (``key``):
    ``"full"``, ``("cached", cut)`` (front + back: a call whose deep part is reused),
    ``"dit_outer"`` (embedding + head) and ``"dit_block"`` (one transformer block)."""
    if key in model._flops:
        return model._flops[key]
    d = model.net_den
    net = M.internals(d.apply_fn, d.params)
    x = jnp.zeros((batch, *model.shape), jnp.float32)
    t = jnp.full((batch,), 0.5, jnp.float32)
    c = jnp.zeros((batch,), jnp.int32)
    p = d.params
    if key == "full":
        v = _cost(lambda p, x, t, c: net(p, x, t, c), p, x, t, c)
    elif isinstance(key, tuple) and key[0] == "cached":
        cut = key[1]
        f = jax.eval_shape(lambda p, x, t, c: net.deep(p, *net.front(p, x, t, c, cut), cut), p, x, t, c)

        def cached(p, x, t, c, f):
            _, ctx = net.front(p, x, t, c, cut)
            return net.back(p, f, ctx, cut)

        v = _cost(cached, p, x, t, c, jnp.zeros(f.shape, f.dtype))
    elif key in ("dit_outer", "dit_block"):

        def outer(p, x, t, c, nblocks):
            h, ctx = net.embed(p, x, t, c)
            for i in range(nblocks):
                h = net.block(p, i, h, ctx)
            return net.head(p, h, ctx)

        v0 = _cost(lambda p, x, t, c: outer(p, x, t, c, 0), p, x, t, c)
        v = v0 if key == "dit_outer" else _cost(lambda p, x, t, c: outer(p, x, t, c, 1), p, x, t, c) - v0
    else:
        raise ValueError(f"unknown FLOP part {key!r}")
    model._flops[key] = v / batch
    return model._flops[key]


# --------------------------------------------------------------------------- runners


@dataclasses.dataclass
class Runner:
    """One program of a group: ``fn(x_T, cond) -> (x, extras)`` and ``counts(extras) ->
    {"calls", "full_calls", "mflop"}`` (per sample; ``extras`` is the list of every chunk's)."""

    fn: Callable
    counts: Callable
    note: str = ""


@dataclasses.dataclass
class Ctx:
    """What a row's builder may use."""

    model: Model
    solver: Any
    nfe: int
    x_cal: Any  # calibration noise (disjoint from the measured samples) and its labels
    c_cal: Any
    models: Callable  # name -> Model (the other models, e.g. T-Stitch's small one)
    exit_heads: str | None = None


def _mean(v) -> float:
    return float(np.mean(np.asarray(v, np.float64)))


def plain_runner(ctx: Ctx, solver=None, den=None) -> Runner:
    solver = solver or ctx.solver
    den = ctx.model.den if den is None else den
    nfe = ctx.nfe
    f = jax.jit(lambda d, x, c: jdiff.sample(solver, d, x, nfe=nfe, cond=c, return_info=True))

    def fn(x, c):
        out, info = f(den, x, c)
        return out, {"calls": info.nfe}

    def counts(extras):
        calls = _mean([e["calls"] for e in extras])
        return {"calls": calls, "full_calls": calls, "mflop": calls * model_flops(ctx.model, "full") / 1e6}

    return Runner(fn, counts)


def _stat(stats, key):
    """The sum over networks and call sites of a carried method's statistic ``key``
    (a per-sample array is averaged over the batch); None when no site reports it."""
    tot, found = 0.0, False
    for per_net in stats or []:
        for d in per_net or []:
            if isinstance(d, dict) and key in d:
                tot += _mean(d[key])
                found = True
    return tot if found else None


def carried_runner(ctx: Ctx, method) -> Runner:
    """A method of :mod:`jdiff.accelerate` carried in the solver state
    (``jdiff.accelerate.sample(..., report=True)``); its statistics give the counts."""
    solver, nfe, model = ctx.solver, ctx.nfe, ctx.model
    f = jax.jit(lambda d, x, c: A.sample(method, solver, d, x, nfe=nfe, cond=c, report=True, return_info=True))

    def fn(x, c):
        out, info, stats = f(model.den, x, c)
        return out, {"nfe": info.nfe, "stats": jax.device_get(stats)}

    def counts(extras):
        # per-sample evaluations as jdiff counts them (a batched guidance call is 2); the
        # method's own counts (batched calls per call site) give the fractions
        evals = _mean([e["nfe"] for e in extras])
        per = {k: [_stat(e["stats"], k) for e in extras] for k in ("calls", "full", "blocks")}
        per = {k: None if None in v else _mean(v) for k, v in per.items()}
        if not per["calls"]:
            return {"calls": evals, "full_calls": None, "mflop": None, "note": "the method reports no calls"}
        frac = 1.0 if per["full"] is None else per["full"] / per["calls"]
        F, note = model_flops(model, "full"), ""
        if per["blocks"] is not None and getattr(method, "cut", None) is None:
            # early exit: every call runs the embedding, the head and `blocks` blocks
            depth = per["blocks"] / per["calls"]
            flops = evals * (model_flops(model, "dit_outer") + depth * model_flops(model, "dit_block"))
            note = f"{depth:.2f} blocks per call (exit heads' FLOPs not counted)"
        elif frac < 1.0:
            cut = getattr(method, "cut", None)
            if cut is None:
                return {"calls": evals, "full_calls": frac * evals, "mflop": None, "note": "the method names no cut"}
            flops = evals * (frac * F + (1 - frac) * model_flops(model, ("cached", int(cut))))
        else:
            flops = evals * F
        return {"calls": evals, "full_calls": frac * evals, "mflop": flops / 1e6, "note": note}

    return Runner(fn, counts)


def _need(name: str):
    """``jdiff.accelerate.<name>`` or :class:`Skip`."""
    obj = getattr(A, name, None)
    if obj is None:
        raise Skip(f"jdiff.accelerate.{name} is not on this branch")
    return obj


# --------------------------------------------------------------------------- the script's own dev methods


@dataclasses.dataclass(frozen=True)
class _DevCount(A.Method):
    """Plain network calls that count themselves in the carried cache: the cost of
    carrying a cache through the sampler, and a check of the script's bookkeeping."""

    name = "dev-count"

    def init(self, net, params, x, t, cond):
        return {"calls": jnp.zeros((), jnp.int32)}

    def call(self, net, params, x, t, cond, cache):
        return net(params, x, t, cond), {"calls": cache["calls"] + 1}

    def stats(self, cache):
        return {"calls": cache["calls"], "full": cache["calls"]}


@dataclasses.dataclass(frozen=True)
class _DevReuse(A.Method):
    """For developing this script only (not a library method): the deep feature at
    ``cut`` recomputed on every ``interval``-th call and reused in between, DeepCache's
    uniform schedule (Ma et al. 2024) in a few lines."""

    interval: int = 2
    cut: int = 1
    name = "dev-reuse"

    def init(self, net, params, x, t, cond):
        h, ctx = net.front(params, x, t, cond, self.cut)
        f = jax.eval_shape(lambda: net.deep(params, h, ctx, self.cut))
        return {"f": jnp.zeros(f.shape, f.dtype), "calls": jnp.zeros((), jnp.int32), "full": jnp.zeros((), jnp.int32)}

    def call(self, net, params, x, t, cond, cache):
        h, ctx = net.front(params, x, t, cond, self.cut)
        full = cache["calls"] % self.interval == 0
        f = jax.lax.cond(full, lambda: net.deep(params, h, ctx, self.cut), lambda: cache["f"])
        new = {"f": f, "calls": cache["calls"] + 1, "full": cache["full"] + full.astype(jnp.int32)}
        return net.back(params, f, ctx, self.cut), new

    def stats(self, cache):
        return {"calls": cache["calls"], "full": cache["full"]}


# --------------------------------------------------------------------------- method rows


def _stitch_runner(ctx: Ctx, fraction: float) -> Runner:
    stitch, stitch_threshold, stitch_calls = (_need(n) for n in ("stitch", "stitch_threshold", "stitch_calls"))
    small = ctx.models("unet-small")
    grid = np.asarray(jdiff.time_grid(ctx.model.den.process, nfe=ctx.nfe, solver=ctx.solver))
    st = stitch(small.den, ctx.model.den, stitch_threshold(grid, fraction))
    calls = stitch_calls(ctx.solver, st, nfe=ctx.nfe)
    run = plain_runner(ctx, den=st)

    def counts(extras):
        flops = calls.large * model_flops(ctx.model, "full") + calls.small * model_flops(small, "full")
        return {
            "calls": calls.small + calls.large,
            "full_calls": calls.large,
            "mflop": flops / 1e6,
            "note": f"{calls.small} small + {calls.large} large calls",
        }

    return Runner(run.fn, counts)


def _adaptive_runner(ctx: Ctx, gamma: float, online: bool, on: str = "eps") -> Runner:
    if online:
        den, solver, note = ctx.model.den, _need("adaptive_solver")(ctx.solver, gamma, on=on), ""
    else:
        ag = _need("adaptive_guidance")(
            ctx.solver, ctx.model.den, ctx.x_cal, cond=ctx.c_cal, gamma=gamma, nfe=ctx.nfe, on=on
        )
        den, solver = ag.denoiser, ctx.solver
        note = f"switch at step {ag.step} of {ag.similarity.shape[0]}"
    run = plain_runner(ctx, solver=solver, den=den)

    def counts(extras):
        out = run.counts(extras)
        return dict(out, full_calls=None, note=note)

    return Runner(run.fn, counts)


def _stream_runner(ctx: Ctx) -> Runner:
    stream = _need("stream")
    solver, nfe, den = ctx.solver, ctx.nfe, ctx.model.den

    def fn(x, c):
        out, info = stream(solver, den, x, cond=c, nfe=nfe, return_info=True)
        return out, {"evals": info.slots * info.ticks / x.shape[0]}

    def counts(extras):
        ev = _mean([e["evals"] for e in extras])
        return {
            "calls": ev,
            "full_calls": None,
            "mflop": ev * model_flops(ctx.model, "full") / 1e6,
            "note": "per output; each chunk is one stream (fill + drain)",
        }

    return Runner(fn, counts)


def _method(name: str, **kw) -> Callable[[Ctx], Runner]:
    """A row of a carried method ``jdiff.accelerate.<name>(**kw)``."""
    return lambda ctx: carried_runner(ctx, _need(name)(**kw))


def _calibrated(name: str, threshold: float, **kw) -> Callable[[Ctx], Runner]:
    """A row of ``jdiff.accelerate.calibrate(<name>(**kw), ...)`` (ERTACache-style: the
    schedule of full calls from the caching error on the calibration noise)."""

    def build(ctx):
        calibrate = _need("calibrate")
        m = calibrate(
            _need(name)(**kw), ctx.solver, ctx.model.den, ctx.x_cal, nfe=ctx.nfe, threshold=threshold, cond=ctx.c_cal
        )
        run = carried_runner(ctx, m)
        return dataclasses.replace(run, note=f"{sum(m.schedule)} of {len(m.schedule)} calls full on the calibration")

    return build


def _exit_row(threshold: float) -> Callable[[Ctx], Runner]:
    """DeeDiff early exit with the DiT's trained exit heads (``--exit-heads``, or the
    heads shipped for the digits DiT)."""

    def build(ctx):
        early_exit, load = _need("early_exit"), _need("load_exit_heads")
        try:
            heads = load(ctx.exit_heads or "digits_dit")
        except (OSError, ValueError) as e:
            raise Skip(f"no trained exit heads for this DiT ({e})") from None
        return carried_runner(ctx, early_exit(heads, threshold))

    return build


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    family: str
    models: tuple
    build: Callable[[Ctx], Runner]


ROWS = [
    # carried (jdiff.accelerate.sample): caching, forecasting, early exit
    Row("deepcache N=3", "cache", ("unet", "dit"), _method("DeepCache", interval=3, cut=1)),
    Row("deepcache N=5", "cache", ("unet", "dit"), _method("DeepCache", interval=5, cut=1)),
    Row("deepcache N=3 cut 2", "cache", ("unet",), _method("DeepCache", interval=3, cut=2)),
    Row("taylorseer O=2 N=4", "cache", ("unet", "dit"), _method("TaylorSeer", order=2, interval=4, cut=1)),
    Row("erta deepcache 0.1", "cache", ("unet", "dit"), _calibrated("DeepCache", 0.1, cut=1)),
    Row(
        "gate O=2 0.05", "cache", ("unet", "dit"), _method("ConfidenceGate", threshold=0.05, order=2, interval=6, cut=1)
    ),
    Row("deediff 0.1", "exit", ("dit",), _exit_row(0.1)),
    Row("deediff 0.2", "exit", ("dit",), _exit_row(0.2)),
    # not carried
    Row("t-stitch 40%", "stitch", ("unet",), lambda ctx: _stitch_runner(ctx, 0.4)),
    *[
        Row(f"adaptive cfg {kind} {g}", "guidance", ("unet-cfg",), partial(_adaptive_runner, gamma=g, online=on))
        for g in (0.99, 0.95, 0.9)
        for kind, on in (("calibrated", False), ("online", True))
    ],
    # the similarity of the x0 predictions (on="x0"): on the digits model the eps predictions
    # agree most at pure noise, the x0 predictions rise toward 1 near the data (docs/accelerate.md)
    *[
        Row(
            f"adaptive cfg x0 {kind} {g}",
            "guidance",
            ("unet-cfg",),
            partial(_adaptive_runner, gamma=g, online=o, on="x0"),
        )
        for g in (0.99, 0.995)
        for kind, o in (("calibrated", False), ("online", True))
    ],
    Row("stream batch", "stream", ("unet", "dit"), _stream_runner),
    # the script's own, for development (only when named in --methods)
    Row("dev-count", "dev", ("unet", "dit", "unet-cfg"), lambda ctx: carried_runner(ctx, _DevCount())),
    Row("dev-reuse2", "dev", ("unet", "dit"), lambda ctx: carried_runner(ctx, _DevReuse(2, 1))),
]


def select_rows(spec: str) -> list[Row]:
    """Comma-separated row names or families; ``all`` is every row but the dev ones,
    ``none`` no row (the plain sampler alone)."""
    want = {w.strip() for w in spec.split(",") if w.strip()}
    rows = [r for r in ROWS if r.name in want or r.family in want or ("all" in want and r.family != "dev")]
    unknown = want - {r.name for r in rows} - {r.family for r in rows} - {"all", "none"}
    if unknown:
        raise SystemExit(f"unknown method rows {sorted(unknown)}; rows: {[r.name for r in ROWS]}")
    return rows


# --------------------------------------------------------------------------- measuring


def noise(den, shape, num: int, seed: int) -> np.ndarray:
    """``jdiff.generate``'s prior noise for samples ``0..num-1`` of ``seed``."""
    keys = per_sample_keys(jax.random.fold_in(jax.random.key(seed), 0), num)
    return np.asarray(den.process.prior_sample(keys, (num, *shape), jnp.float32))


@dataclasses.dataclass
class Scorer:
    clf: Any
    ref: tuple
    boot: int

    @classmethod
    def digits(cls, boot: int):
        clf = digits_classifier()
        _, _, x_held, _ = digits_split()
        return cls(clf, clf.stats(x_held), boot)

    def __call__(self, x, labels) -> dict:
        if not np.all(np.isfinite(x)):
            return {"fd": float("nan"), "accuracy": float("nan"), "boot_std": float("nan")}
        feats = self.clf.features(x)
        out = {"fd": frechet_distance(*gaussian_stats(feats), *self.ref), "accuracy": self.clf.accuracy(x, labels)}
        if self.boot:
            rng = np.random.default_rng(0)
            fds = [
                frechet_distance(*gaussian_stats(feats[rng.integers(0, len(feats), len(feats))]), *self.ref)
                for _ in range(self.boot)
            ]
            out["boot_std"] = float(np.std(fds, ddof=1))
        return out


def run_group(runners: dict, x_T, labels, batch: int, repeats: int, log=print, known=None):
    """Run every runner over all chunks of ``x_T``: chunk 0 compiles, the others are
    interleaved across runners and timed. A runner in ``known`` (name -> ``(x, extras)``,
    its outputs from an earlier run) compiles and is timed on ``repeats`` chunks spread
    over the others, not run on all. Returns per runner ``(x, extras, best_s, compile_s)``
    (``best_s``: the best timed chunk)."""
    n, known = x_T.shape[0], known or {}
    if n % batch:
        raise SystemExit(f"--num ({n}) must be a multiple of --batch ({batch})")
    starts = list(range(0, n, batch))
    outs = {k: [None] * len(starts) for k in runners}
    extras = {k: [None] * len(starts) for k in runners}
    times = {k: [] for k in runners}
    comp = {}

    def call(k, i):
        x, c = jnp.asarray(x_T[starts[i] : starts[i] + batch]), jnp.asarray(labels[starts[i] : starts[i] + batch])
        t0 = time.perf_counter()
        out, e = runners[k].fn(x, c)
        out = np.asarray(jax.block_until_ready(out))
        dt = time.perf_counter() - t0
        outs[k][i], extras[k][i] = out, jax.device_get(e)
        return dt

    for k in runners:
        comp[k] = call(k, 0)
        log(f"    {k}: first chunk (compile + run) {comp[k]:.1f} s")
    # timed: chunks 1.., then chunk 0 again until `repeats` timed calls per runner
    order = list(range(1, len(starts))) + [0] * max(0, repeats - (len(starts) - 1))
    spaced = set(np.linspace(0, len(order) - 1, min(max(repeats, 1), len(order))).round().astype(int).tolist())
    for j, i in enumerate(order):
        for k in runners:
            if k not in known or j in spaced:
                times[k].append(call(k, i))
    res = {}
    for k in runners:
        x, ex = known[k] if k in known else (np.concatenate(outs[k]), extras[k])
        res[k] = (x, ex, min(times[k], default=math.nan), comp[k])
    return res


def _digest(den) -> str:
    """A fingerprint of a denoiser: its structure (static settings included) and weights."""
    structure = re.sub(r" at 0x[0-9a-f]+", "", str(jax.tree.structure(den)))  # no addresses of this process
    h = hashlib.sha256(structure.encode())
    for leaf in jax.tree.leaves(den):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()[:16]


def plain_spread(args, model: Model, runner: Runner, labels, scorer, first: dict) -> tuple[float, str]:
    """The plain sampler's FD spread: the bootstrap std and, with ``--draws K``, the std of
    FD over K disjoint-seed draws (the larger of the two), and a note."""
    spread, note = first.get("boot_std"), f"bootstrap std ({args.boot} resamples) {first.get('boot_std', 0):.4f}"
    if args.draws > 1:
        fds = [first["fd"]]
        for d in range(1, args.draws):
            xd = noise(model.den, model.shape, args.num, args.seed + d)
            res = run_group({"plain": runner}, xd, labels, args.batch, 0, lambda *_: None)
            fds.append(scorer(res["plain"][0], labels)["fd"])
        std = float(np.std(fds, ddof=1))
        note += f"; FD over {args.draws} disjoint draws: std {std:.4f} ({', '.join(f'{v:.4f}' for v in fds)})"
        spread = max(spread or 0.0, std)
    return spread, note


def measure_group(args, model: Model, nfe: int, rows: list[Row], scorer: Scorer, get_model, log=print) -> list[dict]:
    """The plain sampler and every row of ``model`` at ``nfe``."""
    labels = (np.arange(args.num) % 10).astype(np.int32)
    x_T = noise(model.den, model.shape, args.num, args.seed)
    x_cal = jnp.asarray(noise(model.den, model.shape, args.calib, args.seed + 1000))
    c_cal = jnp.asarray(np.arange(args.calib) % 10, np.int32)
    ctx = Ctx(model, jdiff.solvers.get(args.solver), nfe, x_cal, c_cal, get_model, args.exit_heads)
    runners, out = {"plain": plain_runner(ctx)}, []
    for row in rows:
        if model.name in row.models:
            try:
                runners[row.name] = row.build(ctx)
            except Skip as e:
                out.append(_skip_row(model.name, nfe, row.name, row.family, str(e)))
                log(f"    {row.name}: skipped ({e})")
    known, cache_path = {}, None
    if args.plain_cache:
        key = f"{model.name}_{args.solver}_nfe{nfe}_n{args.num}_b{args.batch}_s{args.seed}_{_digest(model.den)}"
        cache_path = os.path.join(args.plain_cache, key + ".npz")
        if os.path.exists(cache_path):
            with np.load(cache_path) as f:
                known["plain"] = (f["x"], [{"calls": c} for c in f["calls"]])
            log(f"    plain: samples from {cache_path} (timed on {args.repeats} chunks)")
    res = run_group(runners, x_T, labels, args.batch, args.repeats, log, known)
    x_plain, ex_plain, t_plain, _ = res["plain"]
    if cache_path and not known:
        os.makedirs(args.plain_cache, exist_ok=True)
        np.savez(cache_path, x=x_plain, calls=np.array([e["calls"] for e in ex_plain]))
    measured = []
    for name, (x, ex, best, comp) in res.items():
        c, s = runners[name].counts(ex), scorer(x, labels)
        notes = [c.get("note"), runners[name].note]
        if name == "plain":
            plain_fd, plain_flop = s["fd"], c["mflop"]
            spread, spread_note = plain_spread(args, model, runners["plain"], labels, scorer, s)
            notes.append(spread_note)
        l2 = np.linalg.norm((x - x_plain).reshape(len(x), -1), axis=1)
        r = dict(
            model=model.name, nfe=nfe, method=name, family=next((w.family for w in rows if w.name == name), "plain"),
            batch=args.batch, ms_per_sample=1e3 * best / args.batch, speedup=t_plain / best,
            calls=c["calls"], full_calls=c.get("full_calls"), mflop=c["mflop"],
            flop_ratio=None if c["mflop"] is None else c["mflop"] / plain_flop,
            fd=s["fd"], d_fd=s["fd"] - plain_fd, fd_spread=spread if name == "plain" else None,
            accuracy=s["accuracy"], l2_to_plain=float(np.mean(l2)), compile_s=comp,
            note="; ".join(n for n in notes if n), model_note=model.note,
        )  # fmt: skip
        measured.append(r)
        log(
            f"    {name}: {r['speedup']:.2f}x, {r['ms_per_sample']:.3f} ms/sample, calls {r['calls']:.1f}, "
            f"FD {r['fd']:.4f} ({r['d_fd']:+.4f}), L2 {r['l2_to_plain']:.4f}"
        )
    return measured + out


def measure(args, models: dict, rows: list[Row], scorer: Scorer, get_model, done=(), log=print):
    """Yield the rows of every group not in ``done`` (``(model, nfe)`` pairs), in the order
    of ``args.nfes`` then ``args.models``; no group starts after ``args.deadline``."""
    for nfe in args.nfes:
        for name in args.models:
            if (name, nfe) in done:
                continue
            if args.deadline and time.perf_counter() > args.deadline:
                log(f"budget of {args.budget} min spent: {name} NFE {nfe} not run")
                yield [_skip_row(name, nfe, "(group)", "-", f"not run: --budget {args.budget} min spent")]
                continue
            t0 = time.perf_counter()
            log(f"== {name}, NFE {nfe}")
            yield measure_group(args, models[name], nfe, rows, scorer, get_model, log)
            log(f"   group took {time.perf_counter() - t0:.0f} s")


def _skip_row(model, nfe, name, family, why) -> dict:
    return dict({k: None for k in COLUMNS}, model=model, nfe=nfe, method=name, family=family, note=f"skipped: {why}")


# --------------------------------------------------------------------------- reporting


def _f(v, fmt) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def markdown(rows: list[dict]) -> str:
    """The measured rows as a table, then the models and the skipped rows as lists."""
    head = ["model", "NFE", "method", "speedup", "ms/sample", "calls", "full", "MFLOP/sample", "FD-digits"]
    head += ["dFD", "L2 to plain", "note"]
    body, skipped, models = [], {}, {}
    for r in rows:
        if r.get("model_note"):
            models.setdefault(r["model"], r["model_note"])
        if r.get("speedup") is None:
            where = skipped.setdefault((r["method"], r["note"]), {})
            where.setdefault(r["model"], []).append(str(r["nfe"]))
            continue
        fd = _f(r["fd"], ".4f") + (f" +- {r['fd_spread']:.4f}" if r.get("fd_spread") is not None else "")
        flop = _f(r["mflop"], ".0f") + ("" if r["flop_ratio"] is None else f" ({r['flop_ratio']:.2f}x)")
        body.append(
            [
                r["model"], r["nfe"], r["method"], f"{r['speedup']:.2f}x", f"{r['ms_per_sample']:.3f}",
                _f(r["calls"], ".1f"), _f(r["full_calls"], ".1f"), flop, fd,
                "" if r["method"] == "plain" else _f(r["d_fd"], "+.4f"), _f(r["l2_to_plain"], ".4f"), r["note"] or "",
            ]
        )  # fmt: skip
    out = [table(body, head)] if body else ["(no row measured)"]
    if models:
        out.append("\n".join(["Models:"] + [f"- {m}: {n}" for m, n in models.items()]))
    if skipped:
        lines = ["Not measured:"]
        for (method, why), where in skipped.items():
            at = "; ".join(f"{m} NFE {', '.join(n)}" for m, n in where.items())
            lines.append(f"- {method} ({at}): {why.removeprefix('skipped: ')}")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def checks(rows: list[dict], k: float = 1.0) -> list[str]:
    """The issue's checks. "FD within the spread": dFD <= k * the plain sampler's spread
    (a method may be better)."""
    ok = [r for r in rows if r.get("speedup") is not None]
    spread = {(r["model"], r["nfe"]): r["fd_spread"] for r in ok if r["method"] == "plain"}

    def within(r):
        s = spread.get((r["model"], r["nfe"]))
        return s is not None and r["d_fd"] <= k * s

    lines = []
    for model, need in (("dit", 2.0), ("unet", 1.5)):
        cand = [r for r in ok if r["model"] == model and r["nfe"] == 50 and r["family"] == "cache" and within(r)]
        best = max(cand, key=lambda r: r["speedup"], default=None)
        if not any(r["model"] == model and r["nfe"] == 50 for r in ok):
            lines.append(f"{model}, NFE 50: a caching method >= {need}x with FD within the spread: - (not measured)")
        elif best is None:
            lines.append(f"{model}, NFE 50: a caching method >= {need}x with FD within the spread: NO (none within)")
        else:
            verdict = "yes" if best["speedup"] >= need else "NO"
            lines.append(
                f"{model}, NFE 50: best caching method within the spread: {best['method']} {best['speedup']:.2f}x "
                f"(dFD {best['d_fd']:+.4f}, spread {spread[(model, 50)]:.4f}) -> {verdict}"
            )
    plain_calls = {(r["model"], r["nfe"]): r["calls"] for r in ok if r["method"] == "plain"}
    # guidance: the same FD both ways (dropping the guidance lowers FD-digits: the unguided
    # model scores better on it, so a drop below the spread is no longer the same sampler)
    ag = [r for r in ok if r["family"] == "guidance" and within(r) and -r["d_fd"] <= k * spread[(r["model"], r["nfe"])]]
    if not [r for r in ok if r["family"] == "guidance"]:
        lines.append("adaptive guidance saves >= 20% of calls at the same FD: - (not measured)")
    elif not ag:
        lines.append("adaptive guidance saves >= 20% of calls at the same FD: NO (no row with the same FD)")
    for r in ag:
        save = 1 - r["calls"] / plain_calls[(r["model"], r["nfe"])]
        lines.append(
            f"adaptive guidance, {r['method']}, NFE {r['nfe']}: {100 * save:.0f}% fewer calls, dFD {r['d_fd']:+.4f} "
            f"-> {'yes' if save >= 0.2 else 'NO'}"
        )
    lines.append(
        f"(within the spread: dFD <= {k:g} x the plain sampler's FD spread at that model and NFE; for guidance "
        "|dFD| <= it)"
    )
    return lines


def write(out_dir: str, rows: list[dict], header: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "accelerate.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    text = header + "\n\n" + markdown(rows) + "\n\n" + "\n".join(f"- {c}" for c in checks(rows)) + "\n"
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text)
    return text


def read_rows(path: str) -> list[dict]:
    def num(v):
        if v in ("", None):
            return None
        try:
            return int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        return [
            {k: (num(v) if k not in ("model", "method", "family", "note") else v) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]  # noqa: E501


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=1000, help="samples per row (FD-digits)")
    ap.add_argument("--batch", type=int, default=100, help="the batch every program runs (timing: per chunk)")
    ap.add_argument("--nfes", type=lambda s: [int(v) for v in s.split(",")], default=[10, 20, 50])
    ap.add_argument("--models", type=lambda s: s.split(","), default=["unet", "dit", "unet-cfg"])
    ap.add_argument("--methods", default="all", help="'all', 'dev', or comma-separated row names / families")
    ap.add_argument("--solver", default="dpm++2m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg-scale", type=float, default=2.0, help="guidance scale of the unet-cfg model")
    ap.add_argument("--calib", type=int, default=64, help="calibration samples (other noise than the measured)")
    ap.add_argument("--repeats", type=int, default=3, help="at least this many timed chunks per program")
    ap.add_argument("--boot", type=int, default=200, help="bootstrap resamples of the plain FD (spread)")
    ap.add_argument("--draws", type=int, default=1, help="disjoint-seed draws of the plain sampler (spread)")
    ap.add_argument("--budget", type=float, default=0, help="minutes after which no new group starts (0: none)")
    ap.add_argument(
        "--dev-models", action="store_true", help="random-weight stand-ins for unshipped digits_dit / digits_small"
    )
    ap.add_argument("--plain-cache", default=None, help="folder keeping the plain samples between runs")
    ap.add_argument("--jax-cache", default=None, help="JAX's persistent compilation cache folder")
    ap.add_argument("--exit-heads", default=None, help="the DiT's trained exit heads (.npz) for DeeDiff")
    ap.add_argument("--table-only", action="store_true", help="rewrite OUT/table.md from OUT/accelerate.csv")
    ap.add_argument("--resume", action="store_true", help="keep the groups already in OUT/accelerate.csv")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "accelerate"))
    args = ap.parse_args(argv)
    rows = select_rows(args.methods)
    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)

    cache: dict = {}

    def get_model(name):
        if name not in cache:
            cache[name] = load_model(name, cfg_scale=args.cfg_scale, dev=args.dev_models)
        return cache[name]

    kept, models, missing = [], {}, []
    path = os.path.join(args.out, "accelerate.csv")
    if args.table_only:
        print(write(args.out, read_rows(path), f"{machine()}, {today()} (the table of {path})"))
        return 0
    if args.resume and os.path.exists(path):
        kept = read_rows(path)
    done = {(r["model"], r["nfe"]) for r in kept if r["method"] == "plain"}
    for name in args.models:
        try:
            models[name] = get_model(name)
        except Skip as e:
            missing.append(_skip_row(name, "-", "(model)", "-", str(e)))
    t0 = time.perf_counter()
    todo = argparse.Namespace(**dict(vars(args), models=[m for m in args.models if m in models]))
    todo.deadline = t0 + 60 * args.budget if args.budget else None
    order = {m: i for i, m in enumerate(args.models)}
    new = []

    def save():
        fresh = {(r["model"], r["nfe"]) for r in new}
        rows_ = [r for r in kept if (r["model"], r["nfe"]) not in fresh] + new + missing
        rows_.sort(key=lambda r: (order.get(r["model"], 99), r["nfe"] if isinstance(r["nfe"], int) else 0))
        header = (
            f"{machine()}, {today()}; {args.num} samples per row (batch {args.batch}), solver {args.solver}, "
            f"seed {args.seed}; this run's wall time {time.perf_counter() - t0:.0f} s"
        )
        return write(args.out, rows_, header)

    text = save()
    for group in measure(todo, models, rows, Scorer.digits(args.boot), get_model, done):
        new += group
        text = save()  # after every group: an interrupted run keeps what it measured
    print("\n" + text)
    with open(os.path.join(args.out, "settings.json"), "w") as f:
        json.dump(dict(vars(args), machine=machine(), date=today()), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
