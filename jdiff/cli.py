"""The ``jdiff`` command line: train from a preset, sample from a run, plot its loss.

::

    jdiff train --preset digits --out runs/digits            # train (resumes if runs/digits has checkpoints)
    jdiff train --preset toy2d --set optim.lr=1e-3 --steps 500
    jdiff train --out runs/digits --resume --steps 3000      # continue a run with its saved config
    jdiff sample --run runs/digits --solver unipc --nfe 10 --guidance 2
    jdiff presets [NAME] [--keys]                            # list presets / show a config / list keys
    jdiff plot --run runs/digits                             # redraw the loss curve

A run directory holds ``config.json`` (the resolved :class:`~jdiff.presets.RunConfig`),
``run.json`` (derived facts: data shape, classes, parameter count, devices),
``metrics.jsonl`` (one JSON object per logged step), ``loss.png``, ``samples/`` (sample
grids or 2-D scatter plots written by process 0) and ``checkpoints/`` (orbax, see
:class:`jdiff.train.Checkpointer`).

Errors in what the user asked for (unknown preset or key, a bad value, a missing run
directory or checkpoint, a checkpoint of another model, data of the wrong shape) are
printed as one line on stderr with exit status 2; set ``JDIFF_DEBUG=1`` for the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from jdiff import presets as P
from jdiff.presets import ConfigError, RunConfig

__all__ = ["main", "CLIError", "build_parser", "load_run", "load_run_state", "build_run", "Run"]

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
CKPT_DIR = "checkpoints"
SAMPLES_DIR = "samples"

# Keys that may change when a run is resumed (besides sample.*): they do not alter what
# the next step computes, except that a new train.steps stretches the cosine schedule.
RESUMABLE_KEYS = (
    "name",
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep",
    "train.grid_every",
    "train.async_checkpointing",
)


class CLIError(Exception):
    """An error in the user's request: printed without traceback, exit status 2."""


# ============================================================================ building


def _process(cfg: RunConfig):
    import jdiff

    name = cfg.objective.process
    if name == "edm":
        return jdiff.edm(sigma_data=cfg.objective.sigma_data)
    return getattr(jdiff, name)()


def load_data(cfg: RunConfig):
    """``(x, labels, num_classes)`` for ``cfg.data``; raises :class:`CLIError` for data
    that does not match the configuration (shape, channels, resolution)."""
    import numpy as np

    from jdiff import data as D

    d = cfg.data
    try:
        if d.source == "digits":
            x, y = D.digits(d.resolution, method=d.upsample)
        elif d.source == "toy":
            x, y = D.toy(d.toy_name, d.toy_size, d.toy_seed)
        elif d.source == "npz":
            x, y = D.load_npz(d.path, channels=d.channels, resolution=d.resolution)
        elif d.source == "image_folder":
            x, y = D.load_image_folder(d.path, d.resolution, d.channels, labels=d.class_conditional)
        elif d.source == "cifar10":
            x, y = D.load_cifar10(d.path)
        else:  # pragma: no cover - excluded by the config's choices
            raise CLIError(f"unknown data source {d.source!r}")
    except (ValueError, OSError) as e:
        raise CLIError(f"data.source={d.source}: {e}") from e
    x = np.asarray(x)
    if d.source == "toy":
        if x.ndim != 2 or x.shape[1] != 2:
            raise CLIError(f"toy data must have shape (N, 2), got {x.shape}")
    else:
        want = (d.resolution, d.resolution, d.channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise CLIError(
                f"data.source={d.source}: expected images of shape (N, {', '.join(map(str, want))}) "
                f"(data.resolution={d.resolution}, data.channels={d.channels}), got {tuple(x.shape)}"
            )
    if not np.all(np.isfinite(x)):
        raise CLIError(f"data.source={d.source}: the data contain non-finite values")
    num_classes = 0
    if y is not None and d.class_conditional:
        y = np.asarray(y, np.int32)
        if y.size and y.min() < 0:
            raise CLIError(f"data.source={d.source}: labels must be non-negative, got min {y.min()}")
        num_classes = int(y.max()) + 1 if y.size else 0
    else:
        y = None
    return x, y, num_classes


def build_model(cfg: RunConfig, data_shape: Sequence[int], num_classes: int, *, abstract: bool = False):
    """The NNX model of ``cfg.model`` for examples of shape ``data_shape`` (with
    ``abstract``: shapes and dtypes only, no initialization compute)."""
    import jax.numpy as jnp
    from flax import nnx

    from jdiff import models as M

    def make(cls, conf):
        if abstract:
            return nnx.eval_shape(lambda: cls(conf, rngs=nnx.Rngs(m.init_seed)))
        return cls(conf, rngs=nnx.Rngs(m.init_seed))

    m = cfg.model
    dtype = None if m.dtype == "float32" else jnp.bfloat16
    try:
        if m.kind == "unet":
            u = m.unet
            h, w, c = data_shape
            conf = M.UNetConfig(
                image_size=h,
                in_channels=c,
                base_channels=u.base_channels,
                channel_mult=tuple(u.channel_mult),
                num_res_blocks=u.num_res_blocks,
                attn_resolutions=tuple(u.attn_resolutions),
                head_channels=u.head_channels,
                dropout=u.dropout,
                emb_mult=u.emb_mult,
                time_embedding=u.time_embedding,
                time_scale=u.time_scale,
                num_classes=num_classes,
                class_dropout=0.0,
                scale_shift=u.scale_shift,
                resblock_updown=u.resblock_updown,
                dtype=dtype,
            )
            return make(M.UNet, conf)
        if m.kind == "mlp":
            s = m.mlp
            conf = M.MLPResNetConfig(
                dim=int(data_shape[0]),
                width=s.width,
                num_blocks=s.num_blocks,
                mlp_ratio=s.mlp_ratio,
                time_embedding=s.time_embedding,
                time_scale=s.time_scale,
                num_classes=num_classes,
                dropout=s.dropout,
                dtype=dtype,
            )
            return make(M.MLPResNet, conf)
        s = m.dit
        h, w, c = data_shape
        conf = M.DiTConfig(
            image_size=h,
            in_channels=c,
            patch_size=s.patch_size,
            hidden_dim=s.hidden_dim,
            depth=s.depth,
            num_heads=s.num_heads,
            mlp_ratio=s.mlp_ratio,
            dropout=s.dropout,
            time_scale=s.time_scale,
            num_classes=num_classes,
            dtype=dtype,
        )
        return make(M.DiT, conf)
    except (ValueError, TypeError) as e:
        raise CLIError(f"model.kind={m.kind}: {e}") from e


def loss_config(cfg: RunConfig, process, num_classes: int):
    from jdiff import train as T

    o = cfg.objective
    try:
        return T.LossConfig(
            process=process,
            prediction=o.prediction,
            weighting=o.weighting,
            min_snr_gamma=o.min_snr_gamma,
            time_sampling=o.time_sampling,
            logit_mean=o.logit_mean,
            logit_std=o.logit_std,
            p_mean=o.p_mean,
            p_std=o.p_std,
            time_input=o.time_input,
            precondition=None if o.precondition == "none" else o.precondition,
            sigma_data=o.sigma_data,
            label_dropout=o.label_dropout if num_classes else 0.0,
            num_classes=num_classes or None,
        )
    except (ValueError, TypeError) as e:
        raise CLIError(f"objective: {e}") from e


def optimizer(cfg: RunConfig):
    """``(optax transformation, learning-rate schedule)`` of ``cfg.optim``."""
    from jdiff import train as T

    o = cfg.optim
    total = cfg.train.steps if o.schedule == "cosine" else None
    try:
        warmup = min(o.warmup_steps, max(cfg.train.steps - 1, 0))  # short test runs keep the preset's warmup
        sched = T.lr_schedule(o.lr, warmup_steps=warmup, total_steps=total, final_lr=o.final_lr)
        tx = T.make_optimizer(sched, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm)
    except ValueError as e:
        raise CLIError(f"optim: {e}") from e
    return tx, sched


def make_solver(name: str, order: int = 0):
    """A solver of ``jdiff.solvers`` by name; ``order`` 0 keeps its default order."""
    from jdiff import solvers as S

    if name not in P.SOLVER_NAMES:
        raise CLIError(f"unknown solver {name!r}; valid solvers: {', '.join(P.SOLVER_NAMES)}")
    factory = getattr(S, name)
    with_order = ("dpm_solver", "dpm_solver_pp", "sde_dpm_solver_pp", "deis", "ipndm", "unipc")
    if order and name not in with_order:
        raise CLIError(f"solver {name} has no order option (solvers with one: {', '.join(with_order)})")
    try:
        return factory(order) if order else factory()
    except ValueError as e:
        raise CLIError(f"solver {name} (order {order}): {e}") from e


def sampling_denoiser_parts(cfg: RunConfig, apply, process):
    """``(apply_fn, prediction, time_input)`` of the trained network as a denoiser."""
    from jdiff import train as T

    o = cfg.objective
    if o.precondition == "edm":
        return T.edm_precondition(apply, process, o.sigma_data), "x0", "t"
    return apply, o.prediction, o.time_input


def make_sample_fn(
    cfg: RunConfig, apply, process, *, solver, nfe: int, grid_kind: str, guidance: float, num_classes: int
):
    """A jitted ``fn(params, x_T, cond, keys) -> (x0, nfe_spent)``."""
    import jax

    import jdiff

    apply_fn, prediction, time_input = sampling_denoiser_parts(cfg, apply, process)
    guided = num_classes > 0 and guidance != 1.0
    # Fail early (and clearly) on a solver / NFE combination that cannot work.
    try:
        jdiff.time_grid(process, nfe=nfe, solver=solver, kind=grid_kind)
        n = solver.num_steps(nfe)
    except ValueError as e:
        raise CLIError(f"{solver.name} at nfe={nfe}: {e}") from e
    if n < solver.min_steps:
        raise CLIError(
            f"{solver.name} needs at least {solver.min_steps} steps; nfe={nfe} gives {n}: raise --nfe or lower --order"
        )

    @jax.jit
    def fn(params, x_T, cond, keys):
        den = jdiff.Denoiser(
            apply_fn=apply_fn, params=params, process=process, prediction=prediction, time_input=time_input
        )
        if guided:
            den = jdiff.wrappers.guidance(den, guidance, num_classes)
        x, info = jdiff.sample(
            solver,
            den,
            x_T,
            cond=cond,
            key=keys if solver.stochastic else None,
            nfe=nfe,
            grid_kind=grid_kind,
            return_info=True,
        )
        return x, info.nfe

    return fn


def draw_samples(fn, params, process, shape, num: int, seed: int, labels=None, batch_size: int = 0):
    """``num`` samples from ``fn`` (see :func:`make_sample_fn`) in chunks of
    ``batch_size``; sample ``i`` depends only on ``(seed, i)``, not on the chunking."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jdiff

    key = jax.random.key(seed)
    noise_keys = jdiff.per_sample_keys(jax.random.fold_in(key, 0), num)
    solver_keys = jdiff.per_sample_keys(jax.random.fold_in(key, 1), num)
    bs = num if batch_size <= 0 else min(batch_size, num)
    out, nfe = [], 0
    for start in range(0, num, bs):
        idx = np.arange(start, start + bs) % num  # the last chunk is padded to keep one compiled program
        x_T = jdiff.prior_sample(process, noise_keys[idx], (bs, *shape))
        cond = None if labels is None else jnp.asarray(np.asarray(labels)[idx], jnp.int32)
        x, n = fn(params, x_T, cond, solver_keys[idx])
        out.append(np.asarray(x)[: min(bs, num - start)])
        nfe = int(n)
    return np.concatenate(out, axis=0), nfe


# ============================================================================ plotting


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.0e}"
    return f"{v:.4g}"


def plot_loss(steps, losses, path: str, title: str = "training loss") -> None:
    """A loss curve as PNG (Pillow only): the logged values (light) and a centred moving
    average (dark); log-scaled y axis when the values span more than 8x."""
    import numpy as np
    from PIL import Image, ImageDraw

    from jdiff.data import save_png

    steps = np.asarray(steps, np.float64)
    losses = np.asarray(losses, np.float64)
    ok = np.isfinite(losses)
    steps, losses = steps[ok], losses[ok]
    W, H, L, R, T, B = 720, 420, 72, 24, 36, 52
    img = Image.new("RGB", (W, H), "white")
    dr = ImageDraw.Draw(img)
    font = _font(12)
    dr.text((L, 10), title, fill="black", font=_font(14))
    dr.rectangle([L, T, W - R, H - B], outline="black")
    if steps.size == 0:
        dr.text((L + 10, T + 10), "no finite values", fill="black", font=font)
        save_png(img, path)
        return
    logy = bool(losses.min() > 0 and losses.max() / losses.min() > 8)
    fy = np.log10 if logy else (lambda v: v)
    y = fy(losses)
    # Centred moving average (no lag), over about 1/25 of the points.
    half_w = max(1, len(losses) // 50)
    csum = np.concatenate([[0.0], np.cumsum(y)])
    idx = np.arange(len(y))
    lo_i, hi_i = np.maximum(idx - half_w, 0), np.minimum(idx + half_w + 1, len(y))
    ys = (csum[hi_i] - csum[lo_i]) / (hi_i - lo_i)
    x0, x1 = float(steps.min()), float(steps.max())
    if x1 <= x0:
        x1 = x0 + 1
    lo, hi = float(y.min()), float(y.max())
    pad = 0.05 * (hi - lo) if hi > lo else (abs(hi) * 0.1 or 1.0)
    lo, hi = lo - pad, hi + pad

    def px(sx):
        return L + (sx - x0) / (x1 - x0) * (W - L - R)

    def py(v):
        return (H - B) - (v - lo) / (hi - lo) * (H - T - B)

    for tx in _nice_ticks(x0, x1):
        X = px(tx)
        dr.line([X, H - B, X, H - B + 4], fill="black")
        dr.line([X, T, X, H - B], fill=(235, 235, 235))
        s = f"{int(tx)}" if float(tx).is_integer() else _fmt(tx)
        dr.text((X - 4 * len(s) / 1.2, H - B + 7), s, fill="black", font=font)
    if logy:
        ticks = []
        for e in range(math.floor(lo) - 1, math.ceil(hi) + 1):
            for m in (1, 2, 5):
                v = math.log10(m) + e
                if lo <= v <= hi:
                    ticks.append((v, m * 10.0**e))
    else:
        ticks = [(v, v) for v in _nice_ticks(lo, hi)]
    for v, label in ticks:
        Y = py(v)
        dr.line([L - 4, Y, L, Y], fill="black")
        dr.line([L, Y, W - R, Y], fill=(235, 235, 235))
        s = _fmt(label)
        dr.text((L - 8 - 7 * len(s), Y - 7), s, fill="black", font=font)
    dr.rectangle([L, T, W - R, H - B], outline="black")
    pts = [(px(a), py(b)) for a, b in zip(steps, y)]
    spts = [(px(a), py(b)) for a, b in zip(steps, ys)]
    if len(pts) > 1:
        dr.line(pts, fill=(160, 190, 230), width=1)
        dr.line(spts, fill=(20, 60, 160), width=2)
    else:
        X, Y = pts[0]
        dr.ellipse([X - 2, Y - 2, X + 2, Y + 2], fill=(20, 60, 160))
    dr.text(((L + W - R) / 2 - 14, H - 20), "step", fill="black", font=font)
    dr.text((6, T - 20), "loss" + (" (log)" if logy else ""), fill="black", font=font)
    save_png(img, path)


def plot_scatter(points, path: str, reference=None, title: str = "") -> None:
    """2-D samples as a square PNG scatter plot; with ``reference`` data, two panels
    on the same axes: the data (grey) and the samples (blue)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from jdiff.data import save_png

    pts = np.asarray(points, np.float64).reshape(-1, 2)
    base = pts if reference is None else np.asarray(reference, np.float64).reshape(-1, 2)
    base = base[np.all(np.isfinite(base), axis=1)]
    if base.size == 0:
        base = np.zeros((1, 2))
    lo = np.percentile(base, 0.5, axis=0)
    hi = np.percentile(base, 99.5, axis=0)
    c = (lo + hi) / 2
    half = float(np.max(hi - lo)) * 0.65 + 1e-6
    S, M, G = 400, 28, 12
    panels = [] if reference is None else [("data", base[:5000], (120, 120, 120))]
    panels.append((f"samples ({pts.shape[0]})", pts, (30, 80, 200)))
    img = Image.new("RGB", (len(panels) * S + (len(panels) - 1) * G, S + M + 18), "white")
    dr = ImageDraw.Draw(img)
    dr.text((6, 6), title, fill="black", font=_font(13))
    for k, (name, p, colour) in enumerate(panels):
        x0 = k * (S + G)
        fin = p[np.all(np.isfinite(p), axis=1)]
        u = x0 + (fin[:, 0] - (c[0] - half)) / (2 * half) * (S - 1)
        v = M + ((c[1] + half) - fin[:, 1]) / (2 * half) * (S - 1)
        inside = (u >= x0) & (u < x0 + S) & (v >= M) & (v < M + S)
        for a, b in zip(u[inside], v[inside]):
            dr.rectangle([float(a) - 1, float(b) - 1, float(a), float(b)], fill=colour)
        dr.rectangle([x0, M, x0 + S - 1, M + S - 1], outline="black")
        out = int(p.shape[0] - inside.sum())
        note = name + (f", {out} outside the view" if out else "")
        dr.text((x0 + 4, M + S + 3), note, fill=(200, 0, 0) if out else "black", font=_font(12))
    save_png(img, path)


def save_samples_png(samples, path: str, *, nrow: int | None = None, reference=None, title: str = "") -> None:
    """Images -> a grid (enlarged with nearest-neighbour so small images stay visible);
    2-D points -> a scatter plot."""
    import numpy as np

    from jdiff import data as D

    x = np.asarray(samples)
    if x.ndim == 2:
        plot_scatter(x, path, reference=reference, title=title)
        return
    zoom = max(1, 48 // max(x.shape[1], 1))
    if zoom > 1:
        x = x.repeat(zoom, axis=1).repeat(zoom, axis=2)
    D.save_image_grid(np.clip(x, -1, 1), path, nrow=nrow, padding=max(2, zoom))


def read_metrics(path: str) -> list[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return rows


def plot_metrics_file(run_dir: str, out: str | None = None, title: str | None = None) -> str:
    rows = [r for r in read_metrics(os.path.join(run_dir, METRICS_FILE)) if "loss" in r]
    if not rows:
        raise CLIError(f"no metrics in {os.path.join(run_dir, METRICS_FILE)}")
    out = out or os.path.join(run_dir, LOSS_PLOT)
    plot_loss(
        [r["step"] for r in rows],
        [r["loss"] for r in rows],
        out,
        title or f"training loss: {os.path.basename(os.path.abspath(run_dir))}",
    )
    return out


# ============================================================================ runs


@dataclasses.dataclass
class Run:
    """Everything built from a configuration (see :func:`build_run`)."""

    cfg: RunConfig
    process: Any
    model: Any
    apply: Any
    params: Any
    data_shape: tuple
    num_classes: int
    x: Any = None
    labels: Any = None


def build_run(
    cfg: RunConfig, *, with_data: bool = True, data_shape=None, num_classes: int | None = None, abstract: bool = False
) -> Run:
    """Data (optional), process and model of ``cfg`` (``abstract``: parameter shapes
    only, e.g. as the target of a checkpoint restore)."""
    from jdiff import models as M

    x = labels = None
    if with_data:
        x, labels, num_classes = load_data(cfg)
        data_shape = tuple(x.shape[1:])
    elif data_shape is None or num_classes is None:
        raise ValueError("give with_data=True, or data_shape and num_classes")
    process = _process(cfg)
    model = build_model(cfg, tuple(data_shape), int(num_classes), abstract=abstract)
    apply, params = M.functional(model)
    return Run(cfg, process, model, apply, params, tuple(int(s) for s in data_shape), int(num_classes), x, labels)


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CLIError(f"{what} not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CLIError(f"cannot read {what} {path}: {e}") from e


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def load_config_file(run_dir: str) -> RunConfig:
    if not os.path.isdir(run_dir):
        raise CLIError(f"run directory not found: {run_dir}")
    d = _read_json(os.path.join(run_dir, CONFIG_FILE), f"run config (is {run_dir} a jdiff run directory?)")
    try:
        cfg = P.config_from_dict(d)
        P.validate_config(cfg)
    except ConfigError as e:
        raise CLIError(f"{os.path.join(run_dir, CONFIG_FILE)}: {e}") from e
    return cfg


def _checkpoint_steps(ckpt_dir: str) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def load_run(run_dir: str) -> tuple[RunConfig, dict, Run]:
    """``(config, run.json dict, Run)`` of a run directory, without loading its data
    when ``run.json`` records the data shape. ``Run.params`` are abstract (shapes
    only): restore values with :func:`load_run_state`."""
    cfg = load_config_file(run_dir)
    info_path = os.path.join(run_dir, RUN_FILE)
    info = _read_json(info_path, "run info") if os.path.exists(info_path) else {}
    if "data_shape" in info and "num_classes" in info:
        run = build_run(
            cfg, with_data=False, data_shape=info["data_shape"], num_classes=info["num_classes"], abstract=True
        )
    else:
        run = build_run(cfg, abstract=True)
    return cfg, info, run


def _train_state_target(run: Run):
    """The shapes, dtypes and (first local device) placement of the run's TrainState."""
    import jax
    from jax.sharding import SingleDeviceSharding

    from jdiff import train as T

    tx, _ = optimizer(run.cfg)
    shapes = jax.eval_shape(
        lambda p: T.init_train_state(p, tx, run.cfg.train.seed, ema=run.cfg.ema.decay is not None), run.params
    )
    dev = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), shapes)


def load_run_state(run_dir: str, step: int | None = None):
    """``(config, run.json dict, Run, TrainState, step)`` from a run's newest (or the
    given) checkpoint. Raises :class:`CLIError` if there is none and
    :class:`jdiff.train.CheckpointMismatchError` if it belongs to another model."""
    from jdiff import train as T

    cfg, info, run = load_run(run_dir)
    ckpt_dir = os.path.join(run_dir, CKPT_DIR)
    steps = _checkpoint_steps(ckpt_dir)
    if not steps:
        raise CLIError(f"no checkpoint found in {ckpt_dir}")
    if step is not None and step not in steps:
        raise CLIError(f"no checkpoint of step {step} in {ckpt_dir}; available steps: {steps}")
    target = _train_state_target(run)
    with T.Checkpointer(ckpt_dir, async_save=False, keep=None) as ck:
        restored = ck.restore(target, step=step)
    if restored is None:
        raise CLIError(f"no usable checkpoint in {ckpt_dir}")
    return cfg, info, run, restored.state, restored.step


def _to_host(tree):
    """A replicated (possibly multi-host) pytree as local numpy arrays."""
    import jax
    import numpy as np

    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree.map(get, tree)


# ============================================================================ train


class _StopFlag:
    """SIGTERM (and a first Ctrl-C) ask the loop to save and stop; a second Ctrl-C
    interrupts at once."""

    def __init__(self):
        from jdiff.train import SigtermFlag

        def on_signal(signum, already_set):
            if signum != signal.SIGINT:
                return
            if already_set:
                raise KeyboardInterrupt
            if _is_main():
                print(
                    "\ninterrupt: saving a checkpoint and stopping (Ctrl-C again to abort)", file=sys.stderr, flush=True
                )

        self.flag = SigtermFlag(signals=(signal.SIGTERM, signal.SIGINT), on_signal=on_signal)

    def __enter__(self):
        self.flag.install()
        return self.flag

    def __exit__(self, *exc):
        self.flag.uninstall()


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _init_distributed(args) -> None:
    """Start the multi-process runtime if the flags or environment ask for it."""
    from jdiff.train import initialize_distributed

    coord = args.coordinator or os.environ.get("JDIFF_COORDINATOR")
    nproc = args.num_processes if args.num_processes is not None else os.environ.get("JDIFF_NUM_PROCESSES")
    pid = args.process_id if args.process_id is not None else os.environ.get("JDIFF_PROCESS_ID")
    nproc = None if nproc in (None, "") else int(nproc)
    pid = None if pid in (None, "") else int(pid)
    if args.cpu_devices:
        import jax

        jax.config.update("jax_num_cpu_devices", int(args.cpu_devices))
    if args.distributed and coord is None and nproc is None:
        os.environ["JDIFF_DISTRIBUTED"] = "1"  # let JAX detect the cluster (TPU pod, SLURM, ...)
        initialize_distributed()
        return
    if nproc is not None and nproc > 1:
        if coord is None or pid is None:
            raise CLIError(
                "a multi-process run needs --coordinator HOST:PORT and --process-id "
                "(or JDIFF_COORDINATOR / JDIFF_PROCESS_ID)"
            )
        if not 0 <= pid < nproc:
            raise CLIError(f"--process-id must be in [0, {nproc}), got {pid}")
        initialize_distributed(coord, nproc, pid)
    elif coord is not None and nproc is None:
        initialize_distributed(coord, None, pid)


def _resolve_train_config(args) -> tuple[RunConfig, str]:
    """The configuration to train with, and the run directory."""
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    out = args.out
    if args.resume:
        if out is None:
            raise CLIError("--resume needs --out DIR (the run to continue)")
        saved = load_config_file(out)
        if args.preset is not None and args.preset != saved.name:
            raise CLIError(f"{out} holds a run of preset {saved.name!r}, not {args.preset!r}")
        if not _checkpoint_steps(os.path.join(out, CKPT_DIR)):
            raise CLIError(f"--resume: no checkpoint found in {os.path.join(out, CKPT_DIR)}")
        base = saved
    else:
        if args.preset is None:
            raise CLIError(f"give --preset NAME (one of: {', '.join(P.preset_names())}) or --resume --out DIR")
        base = P.get_preset(args.preset)
        saved = None
    cfg = P.apply_overrides(base, overrides)
    if out is None:
        out = os.path.join("runs", cfg.name)
    cfg_path = os.path.join(out, CONFIG_FILE)
    has_ckpt = bool(_checkpoint_steps(os.path.join(out, CKPT_DIR)))
    if saved is None and os.path.exists(cfg_path):
        saved = load_config_file(out)
    if saved is not None and has_ckpt:
        diff = {
            k: v
            for k, v in P.config_diff(saved, cfg).items()
            if k not in RESUMABLE_KEYS and not k.startswith("sample.")
        }
        if diff:
            lines = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
            raise CLIError(
                f"{out} has checkpoints of a run with a different configuration ({lines}); "
                "use another --out, or the run's settings (jdiff train --out DIR --resume)"
            )
    return cfg, out


def cmd_train(args) -> int:
    t_start = time.perf_counter()  # wall_time in metrics.jsonl counts from here (data, init, compile included)
    # Everything before _init_distributed must stay off the JAX backend.
    cfg, out = _resolve_train_config(args)
    _init_distributed(args)

    import jax
    import numpy as np
    from tqdm.auto import tqdm

    import jdiff
    from jdiff import data as D
    from jdiff import models as M
    from jdiff import train as T

    main_proc = jax.process_index() == 0
    ckpt_dir = os.path.join(out, CKPT_DIR)
    run = build_run(cfg)
    if main_proc:
        os.makedirs(os.path.join(out, SAMPLES_DIR), exist_ok=True)
        _write_json(os.path.join(out, CONFIG_FILE), P.config_to_dict(cfg))
        _write_json(
            os.path.join(out, RUN_FILE),
            {
                "preset": cfg.name,
                "argv": list(sys.argv),
                "data_shape": list(run.data_shape),
                "num_classes": run.num_classes,
                "num_examples": int(run.x.shape[0]),
                "num_params": M.count_params(run.params),
                "process_count": jax.process_count(),
                "device_count": jax.device_count(),
                "devices": str(jax.devices()[0].device_kind),
                "platform": jax.default_backend(),
                "jax_version": jax.__version__,
                "jdiff_version": jdiff.__version__,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        print(
            f"jdiff train: preset {cfg.name}, {M.count_params(run.params):,} parameters, data "
            f"{tuple(run.x.shape)}{f', {run.num_classes} classes' if run.num_classes else ''}, "
            f"{jax.device_count()} device(s) on {jax.process_count()} process(es) -> {out}",
            flush=True,
        )

    t = cfg.train
    arrays = {"x": run.x} if run.labels is None else {"x": run.x, "label": run.labels}
    try:
        loader = D.Loader(arrays, t.batch_size, cfg.data.shuffle_seed)
    except ValueError as e:
        raise CLIError(str(e)) from e
    mesh = T.make_mesh()
    n_dev = mesh.devices.size
    if t.batch_size % n_dev or (t.batch_size // cfg.optim.accum_steps) % n_dev:
        raise CLIError(
            f"train.batch_size {t.batch_size} (and each of optim.accum_steps={cfg.optim.accum_steps} "
            f"micro-batches) must be divisible by the {n_dev} devices"
        )
    lc = loss_config(cfg, run.process, run.num_classes)
    loss_fn = T.make_loss_fn(run.apply, lc)
    tx, sched = optimizer(cfg)

    # Sample grids (process 0, on its first local device, from host copies of the params).
    grid_fn = None
    sample_labels = None
    reference = run.x[:5000] if run.x.ndim == 2 else None
    if main_proc:
        s = cfg.sample
        solver = make_solver(s.solver, s.order)
        grid_fn = make_sample_fn(
            cfg,
            run.apply,
            run.process,
            solver=solver,
            nfe=s.nfe,
            grid_kind=s.grid_kind,
            guidance=s.guidance,
            num_classes=run.num_classes,
        )
        if run.num_classes:
            sample_labels = np.arange(s.num) % run.num_classes

    def write_grid(step, state):
        s = cfg.sample
        params = state.ema_params if (s.ema and state.ema_params is not None) else state.params
        host = _to_host(params)
        with jax.default_device(jax.local_devices()[0]):
            x, _ = draw_samples(grid_fn, host, run.process, run.data_shape, s.num, s.seed, sample_labels)
        path = os.path.join(out, SAMPLES_DIR, f"step_{step:07d}.png")
        nrow = run.num_classes if (run.num_classes and s.num % run.num_classes == 0) else None
        save_samples_png(
            x, path, nrow=nrow, reference=reference, title=f"{cfg.name} step {step} ({s.solver}, nfe {s.nfe})"
        )
        return path

    metrics_path = os.path.join(out, METRICS_FILE)
    stop_at = args.stop_at
    stopper = _StopFlag()
    gen = T.train_iter(
        loss_fn,
        run.params,
        loader,
        t.steps,
        optimizer=tx,
        seed=t.seed,
        mesh=mesh,
        checkpoint_dir=ckpt_dir,
        save_every=t.checkpoint_every,
        keep=t.keep,
        async_checkpointing=t.async_checkpointing,
        accum_steps=cfg.optim.accum_steps,
        ema_decay=cfg.ema.decay,
        ema_warmup=cfg.ema.warmup,
        schedule=sched,
        stop_flag=stopper.flag,
    )
    result = bar = None
    wall_offset = 0.0
    last_loss = float("nan")
    pending: list = []
    interval_t0, interval_steps = t_start, 0
    start_step = None
    with stopper, contextlib.closing(gen):
        try:
            item = _advance(gen, None)
            while item is not None and not isinstance(item, T.TrainResult):
                step, metrics, state = item
                if start_step is None:
                    # First step: it includes compilation, so it is left out of steps/s.
                    start_step = step - 1
                    jax.block_until_ready(metrics)
                    interval_t0, interval_steps = time.perf_counter(), 0
                    if main_proc:
                        wall_offset = _trim_metrics(metrics_path, start_step)
                        if start_step > 0:
                            print(f"resumed at step {start_step}", flush=True)
                        bar = tqdm(
                            total=t.steps,
                            initial=start_step,
                            unit="step",
                            dynamic_ncols=True,
                            desc=cfg.name,
                            smoothing=0.1,
                            file=sys.stderr,
                            disable=args.no_progress,
                        )
                else:
                    interval_steps += 1
                if main_proc:
                    pending.append(metrics)
                    bar.update(1)
                if main_proc and (step % t.log_every == 0 or step == t.steps):
                    host = jax.device_get(pending)  # waits for the steps dispatched so far
                    now = time.perf_counter()
                    row = _metrics_row(
                        step, host, interval_steps, now - interval_t0, t.batch_size, wall_offset + (now - t_start)
                    )
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    last_loss = row.get("loss", float("nan"))
                    bar.set_postfix(loss=f"{last_loss:.4g}", refresh=False)
                    pending.clear()
                    interval_t0, interval_steps = now, 0
                if main_proc and t.grid_every and step % t.grid_every == 0 and step != t.steps:
                    write_grid(step, state)
                    plot_metrics_file(out, title=f"training loss: {cfg.name}")
                    interval_t0, interval_steps = time.perf_counter(), 0
                item = _advance(gen, stop_at is not None and step >= stop_at)
            result = item
            if main_proc and pending and result is not None:
                # Log the steps since the last line (a run stopped between log steps).
                host = jax.device_get(pending)
                now = time.perf_counter()
                row = _metrics_row(
                    result.step, host, interval_steps, now - interval_t0, t.batch_size, wall_offset + (now - t_start)
                )
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                last_loss = row.get("loss", float("nan"))
        finally:
            if bar is not None:
                bar.close()
    if result is None or start_step is None:
        if main_proc:
            print(
                f"nothing to do: the run in {out} has reached train.steps={t.steps} "
                "(raise it with --steps to continue)",
                flush=True,
            )
        return 0
    if main_proc:
        wall = wall_offset + (time.perf_counter() - t_start)
        if result.step >= t.steps and not result.stopped:
            path = write_grid(result.step, result.state)
            plot_metrics_file(out, title=f"training loss: {cfg.name}")
            print(
                f"done: step {result.step}/{t.steps}, loss {last_loss:.5g}, wall time {wall:.1f} s; "
                f"samples {path}; checkpoints {ckpt_dir}",
                flush=True,
            )
        else:
            why = "SIGTERM" if result.preempted else "stop requested"
            if read_metrics(metrics_path):
                plot_metrics_file(out, title=f"training loss: {cfg.name}")
            print(
                f"stopped at step {result.step}/{t.steps} ({why}); checkpoint saved in {ckpt_dir}; "
                f"continue with: jdiff train --out {out} --resume",
                flush=True,
            )
    return 0


def _advance(gen, send):
    """The loop's next ``(step, metrics, state)``, or its :class:`TrainResult` when it
    has finished (``None`` if it never ran a step and returned nothing)."""
    try:
        return next(gen) if send is None else gen.send(bool(send))
    except StopIteration as e:
        return e.value


def _metrics_row(step: int, host: list, steps: int, seconds: float, batch_size: int, wall: float) -> dict:
    """One metrics line: interval means of the step metrics (``lr``: the last value)."""
    import numpy as np

    row: dict[str, Any] = {"step": int(step)}
    for k in sorted(host[0]) if host else ():
        vals = [float(np.asarray(m[k])) for m in host]
        row[k] = vals[-1] if k == "lr" else float(np.mean(vals))
    rate = steps / seconds if steps and seconds > 0 else None
    row["steps_per_sec"] = rate
    row["samples_per_sec"] = None if rate is None else rate * batch_size
    row["wall_time"] = wall
    return row


def _trim_metrics(path: str, step: int) -> float:
    """Drop logged lines past ``step`` (a resumed run redoes those steps); return the
    wall time of the last line kept (the run's time before this invocation)."""
    rows = read_metrics(path)
    if not rows:
        return 0.0
    keep = [r for r in rows if int(r.get("step", 0)) <= step]
    if len(keep) != len(rows):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    return float(keep[-1].get("wall_time", 0.0)) if keep else 0.0


# ============================================================================ sample


def cmd_sample(args) -> int:
    import numpy as np

    run_dir = args.run
    if not os.path.isdir(run_dir):
        raise CLIError(f"run directory not found: {run_dir}")
    cfg = load_config_file(run_dir)
    ckpt_dir = os.path.join(run_dir, CKPT_DIR)
    if not _checkpoint_steps(ckpt_dir):
        raise CLIError(f"no checkpoint found in {ckpt_dir}")
    s = cfg.sample
    solver_name = args.solver or s.solver
    order = s.order if (args.order is None and args.solver is None) else (args.order or 0)
    nfe = args.nfe if args.nfe is not None else s.nfe
    num = args.num if args.num is not None else s.num
    seed = args.seed if args.seed is not None else s.seed
    use_ema = s.ema if args.ema is None else args.ema
    grid_kind = args.grid_kind or s.grid_kind
    if nfe < 1:
        raise CLIError(f"--nfe must be >= 1, got {nfe}")
    if num < 1:
        raise CLIError(f"--num must be >= 1, got {num}")
    if grid_kind not in P.GRID_KINDS:
        raise CLIError(f"unknown grid kind {grid_kind!r}; valid kinds: {', '.join(P.GRID_KINDS)}")
    solver = make_solver(solver_name, order)

    cfg, info, run, state, step = load_run_state(run_dir, args.step)
    nc = run.num_classes
    guidance = s.guidance if args.guidance is None else args.guidance
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
        labels = np.full(num, args.label, np.int32) if args.label is not None else np.arange(num) % nc
    if use_ema and state.ema_params is None:
        raise CLIError("this run has no EMA parameters (ema.decay=none): use --no-ema")
    params = _to_host(state.ema_params if use_ema else state.params)
    fn = make_sample_fn(
        cfg, run.apply, run.process, solver=solver, nfe=nfe, grid_kind=grid_kind, guidance=guidance, num_classes=nc
    )
    t0 = time.perf_counter()
    x, spent = draw_samples(fn, params, run.process, run.data_shape, num, seed, labels, args.batch_size)
    seconds = time.perf_counter() - t0
    if not np.all(np.isfinite(x)):
        print(f"warning: {int((~np.isfinite(x)).sum())} non-finite values in the samples", file=sys.stderr)

    tag = f"{solver_name}{f'-{order}' if order else ''}_nfe{nfe}_step{step}"
    out = args.out or os.path.join(run_dir, SAMPLES_DIR, f"sample_{tag}.png")
    root, ext = os.path.splitext(out)
    png = out if ext.lower() == ".png" else out + ".png"
    npz = (root if ext.lower() == ".png" else out) + ".npz"
    reference = None
    if cfg.data.source == "toy":
        reference = load_data(cfg)[0][:5000]
    nrow = nc if (nc and args.label is None and num % nc == 0) else None
    title = f"{cfg.name} step {step}: {solver.name}, nfe {spent}" + (f", guidance {guidance:g}" if nc else "")
    save_samples_png(x, png, nrow=nrow, reference=reference, title=title)
    os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
    np.savez(
        npz,
        samples=x,
        labels=labels if labels is not None else np.zeros((0,), np.int32),
        solver=solver.name,
        nfe=spent,
        step=step,
        guidance=guidance,
        ema=use_ema,
        seed=seed,
    )
    print(
        f"{num} samples from step {step} ({'EMA' if use_ema else 'raw'} params) with {solver.name}, "
        f"nfe {spent}{f', guidance {guidance:g}' if nc else ''} in {seconds:.1f} s -> {png}, {npz}"
    )
    return 0


# ============================================================================ small commands


def cmd_presets(args) -> int:
    if args.name:
        cfg = P.apply_overrides(P.get_preset(args.name), args.set or [])
        if args.keys:
            print(P.describe_keys(cfg))
        else:
            print(json.dumps(P.config_to_dict(cfg), indent=2))
        return 0
    if args.keys:
        print(P.describe_keys())
        return 0
    for name, fn in P.PRESETS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        print(f"{name:14s} {doc}")
    return 0


def cmd_plot(args) -> int:
    if not os.path.isdir(args.run):
        raise CLIError(f"run directory not found: {args.run}")
    path = plot_metrics_file(args.run, args.out)
    print(path)
    return 0


# ============================================================================ parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Show a default only where there is one worth showing (not None / False) and the
    help text does not already say it."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if d in (None, False, argparse.SUPPRESS) or "default" in h or action.option_strings == []:
            return h
        return f"{h} (default: {d})"


def _bool_flag(p, name: str, dest: str, help_on: str, help_off: str):
    g = p.add_mutually_exclusive_group()
    g.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=help_on)
    g.add_argument(f"--no-{name}", dest=dest, action="store_false", default=None, help=help_off)


def build_parser() -> argparse.ArgumentParser:
    preset_list = ", ".join(P.preset_names())
    parser = argparse.ArgumentParser(
        prog="jdiff",
        formatter_class=_Formatter,
        description="Train and sample diffusion / flow models with jdiff.",
        epilog="Run 'jdiff COMMAND --help' for a command's options. Errors exit with status 2.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tr = sub.add_parser(
        "train",
        formatter_class=_Formatter,
        help="train a model from a preset",
        description="Train from a named preset. Writes config.json, run.json, metrics.jsonl, loss.png, sample "
        "grids and orbax checkpoints into --out. A directory that already holds checkpoints of the "
        "same configuration is resumed exactly (model, optimizer, EMA, RNG and data position). "
        "SIGTERM or Ctrl-C saves a checkpoint and exits with status 0.",
        epilog="examples:\n  jdiff train --preset digits --out runs/digits\n"
        "  jdiff train --preset toy2d --set optim.lr=1e-3 --set model.mlp.width=64 --steps 500\n"
        "  jdiff train --out runs/digits --resume --steps 3000\n"
        "  jdiff presets digits --keys      # every key --set accepts, with its type\n"
        "multi-host: run the same command on every host with --coordinator HOST0:PORT "
        "--num-processes N --process-id I (or JDIFF_COORDINATOR / JDIFF_NUM_PROCESSES / JDIFF_PROCESS_ID, "
        "or --distributed on a TPU pod / SLURM); --out must be on a shared file system.",
    )
    tr.add_argument("--preset", help=f"named configuration: {preset_list}")
    tr.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. optim.lr=3e-4 or model.unet.channel_mult=1,2,2 (repeatable)",
    )
    tr.add_argument("--out", metavar="DIR", help="run directory (default: runs/<preset>)")
    tr.add_argument("--steps", type=int, help="total training steps (same as --set train.steps=N)")
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its saved config.json (--preset not needed; --set and "
        "--steps still apply); fails if it has no checkpoint",
    )
    tr.add_argument(
        "--stop-at",
        type=int,
        metavar="STEP",
        help="save a checkpoint and stop after this step, as on SIGTERM (resume later)",
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--coordinator", metavar="HOST:PORT", help="multi-host: address of process 0")
    tr.add_argument("--num-processes", type=int, metavar="N", help="multi-host: number of processes (one per host)")
    tr.add_argument("--process-id", type=int, metavar="I", help="multi-host: this process's index in [0, N)")
    tr.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: let jax.distributed.initialize detect the cluster (Cloud TPU, SLURM, ...)",
    )
    tr.add_argument(
        "--cpu-devices",
        type=int,
        metavar="N",
        help="split the CPU into N JAX devices (data parallelism on one machine, for testing)",
    )
    tr.set_defaults(fn=cmd_train)

    sa = sub.add_parser(
        "sample",
        formatter_class=_Formatter,
        help="sample from a trained run",
        description="Load a run's config and newest checkpoint and sample with any jdiff solver. Writes a PNG "
        "(image grid, or a 2-D scatter plot) and an .npz with the samples. Unset options default to "
        "the run's 'sample' config section.",
        epilog="examples:\n  jdiff sample --run runs/digits --solver unipc --nfe 10 --guidance 2\n"
        "  jdiff sample --run runs/digits --solver sde_dpm_solver_pp --nfe 50 --label 3 --num 16\n"
        f"solvers: {', '.join(P.SOLVER_NAMES)}",
    )
    sa.add_argument("--run", required=True, metavar="DIR", help="run directory written by 'jdiff train'")
    sa.add_argument(
        "--solver",
        choices=P.SOLVER_NAMES,
        metavar="NAME",
        help=f"sampler, one of: {', '.join(P.SOLVER_NAMES)} (default: the run's sample.solver)",
    )
    sa.add_argument(
        "--order",
        type=int,
        metavar="K",
        help="solver order, for dpm_solver, dpm_solver_pp, sde_dpm_solver_pp, deis, ipndm, unipc "
        "(default: the solver's own; the run's sample.order if --solver is not given)",
    )
    sa.add_argument("--nfe", type=int, metavar="N", help="number of model evaluations (default: the run's sample.nfe)")
    sa.add_argument(
        "--grid-kind",
        metavar="KIND",
        help=f"time grid: {', '.join(P.GRID_KINDS)} (default: the run's sample.grid_kind)",
    )
    sa.add_argument("--num", type=int, metavar="M", help="number of samples (default: the run's sample.num)")
    sa.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="seed of the prior noise and of stochastic solvers (default: the run's sample.seed)",
    )
    _bool_flag(
        sa,
        "ema",
        "ema",
        "use the EMA parameters (default: the run's sample.ema, true in the presets)",
        "use the raw trained parameters",
    )
    sa.add_argument(
        "--guidance",
        type=float,
        metavar="W",
        help="classifier-free guidance scale, 1: conditional model alone, 0: unconditional "
        "(default: the run's sample.guidance)",
    )
    sa.add_argument("--label", type=int, metavar="L", help="class of every sample (default: cycle through classes)")
    sa.add_argument("--step", type=int, metavar="STEP", help="checkpoint step (default: the newest)")
    sa.add_argument("--batch-size", type=int, default=0, metavar="B", help="samples per call (0: all at once)")
    sa.add_argument(
        "--out",
        metavar="FILE",
        help="output PNG (the .npz goes next to it; default: DIR/samples/sample_<solver>_nfe<N>_step<S>.png)",
    )
    sa.set_defaults(fn=cmd_sample)

    pr = sub.add_parser(
        "presets",
        formatter_class=_Formatter,
        help="list presets, show one, or list config keys",
        description="Without NAME: list the presets. With NAME: print its resolved config as JSON "
        "(after --set). --keys: every key with its type, value and help.",
    )
    pr.add_argument("name", nargs="?", help="preset to show")
    pr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key before showing")
    pr.add_argument("--keys", action="store_true", help="list keys with types and help")
    pr.set_defaults(fn=cmd_presets)

    pl = sub.add_parser(
        "plot",
        formatter_class=_Formatter,
        help="draw a run's loss curve",
        description="Draw the loss curve of a run's metrics.jsonl as a PNG.",
    )
    pl.add_argument("--run", required=True, metavar="DIR", help="run directory")
    pl.add_argument("--out", metavar="FILE", help="output PNG (default: DIR/loss.png)")
    pl.set_defaults(fn=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jdiff`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from jdiff.train._checkpoint import CheckpointCorruptError, CheckpointMismatchError

    try:
        return int(args.fn(args) or 0)
    except (CLIError, ConfigError, CheckpointMismatchError, CheckpointCorruptError) as e:
        if os.environ.get("JDIFF_DEBUG"):
            raise
        print(f"jdiff {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
