"""Plots for runs (Pillow only): a loss curve, 2-D scatter plots, image grids; and the
NFE sweep's figure (:func:`plot_sweep`, matplotlib).

:func:`save_image` writes PNG or JPEG by the file's extension (:data:`IMAGE_FORMATS`);
any other extension is an error, never a silently renamed file.
"""

from __future__ import annotations

import json
import math
import os

__all__ = [
    "IMAGE_FORMATS",
    "image_format",
    "save_image",
    "plot_loss",
    "plot_scatter",
    "save_samples",
    "read_metrics",
    "plot_sweep",
]

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def image_format(path: str) -> str:
    """``"PNG"`` or ``"JPEG"`` from ``path``'s extension; ``ValueError`` for others."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in IMAGE_FORMATS:
        raise ValueError(f"cannot write an image as {ext or 'a file without extension'!r}: use .png, .jpg or .jpeg")
    return IMAGE_FORMATS[ext]


def save_image(img, path) -> None:
    """Write a Pillow image in the format of ``path``'s extension (PNG or JPEG),
    atomically (:func:`jdiff.data.save_png`)."""
    from jdiff.data import save_png

    save_png(img, path, format=image_format(path))


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
        save_image(img, path)
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
    save_image(img, path)


def plot_scatter(points, path: str, reference=None, title: str = "") -> None:
    """2-D samples as a square PNG scatter plot; with ``reference`` data, two panels
    on the same axes: the data (grey) and the samples (blue)."""
    import numpy as np
    from PIL import Image, ImageDraw

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
    save_image(img, path)


def save_samples(samples, path: str, *, nrow: int | None = None, reference=None, title: str = "") -> None:
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
    from PIL import Image

    grid = D.make_image_grid(np.clip(x, -1, 1), nrow, padding=max(2, zoom))
    save_image(Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid), path)


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


def plot_sweep(best: dict, path: str, *, title: str = "", families=(), points=()) -> None:
    """The NFE sweep's figure (``fd_vs_nfe.png``): one panel per metric, one line per
    solver family through its best configuration at each NFE, and the front (the best
    of all families) as a dashed black line; log axes. The full per-solver table is in
    the sweep's ``results.md`` beside it.

    Args:
      best: ``{metric: {family: {nfe: row}}}`` (:func:`jdiff.sweep.family_best`); a
        row's ``solver`` names the configuration, ``metric`` its value.
      path: the PNG file.
      title: the figure's title.
      families: the known families in a fixed order, so each keeps its colour from
        figure to figure (others follow in the order met).
      points: single configurations drawn as labelled markers, not lines (few-step
        students, :mod:`jdiff.distill`): dicts with ``label``, ``nfe`` and a value per
        metric (a point without a panel's metric is left out of that panel).
    """
    # matplotlib (log axes, legends) only for this figure: heavy, so imported here
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(best)
    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 5.5), squeeze=False)
    met = list(dict.fromkeys(f for m in metrics for f in best[m]))
    families = list(families) + [f for f in met if f not in families]
    cmap = plt.get_cmap("tab10")
    point_labels = list(dict.fromkeys(p["label"] for p in points))
    markers = "*^sDvP<>Xph"
    for ax, metric in zip(axes[0], metrics):
        front: dict[int, float] = {}
        for i, fam in enumerate(families):
            pts = sorted((n, r[metric]) for n, r in best[metric].get(fam, {}).items() if r[metric] > 0)
            for n, v in pts:
                front[n] = min(front.get(n, v), v)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "-o", ms=3.5, lw=1.3, color=cmap(i % 10), label=fam)
        if front:
            xs, ys = zip(*sorted(front.items()))
            ax.plot(xs, ys, "--", color="black", lw=1.0, label="best of all")
        for j, label in enumerate(point_labels):
            pts = sorted((p["nfe"], p[metric]) for p in points if p["label"] == label and (p.get(metric) or 0) > 0)
            if pts:
                xs, ys = zip(*pts)
                c = plt.get_cmap("Dark2")(j % 8)  # apart from the families' tab10
                ax.plot(xs, ys, markers[j % len(markers)], ms=9, mec="black", mew=0.6, color=c, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        nfes = sorted({n for fam in best[metric].values() for n in fam} | {p["nfe"] for p in points if metric in p})
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        lo, hi = ax.get_ylim()
        if hi / lo < 12:  # within about a decade: label the minor ticks too
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
        else:
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("NFE (network evaluations per sample)")
        ax.set_ylabel(f"{metric} (best of each family)")
        ax.set_title(metric, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title or "sample quality against NFE", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
