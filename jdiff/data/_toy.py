"""Two-dimensional toy distributions.

The four sets are the ones popularised for continuous normalizing flows and diffusion
by FFJORD (Grathwohl et al., 2019, "FFJORD: Free-form continuous dynamics for scalable
reversible generative models", ICLR; its ``toy_data.py``) and the scikit-learn
generators ``make_moons`` / ``make_swiss_roll`` it builds on. jdiff keeps their shapes
but sets its own scales so that every coordinate has standard deviation of order 1
(roughly what a diffusion prior ``N(0, I)`` expects); the exact definitions are in
:func:`toy`.

Determinism: sample ``i`` is a fixed function of row ``i`` of
``np.random.default_rng(seed).random((n, k))`` (``k`` uniforms per sample, filled row by
row), so ``toy(name, m, seed)`` is exactly the first ``m`` rows of ``toy(name, n, seed)``
for ``m <= n``: enlarging a data set never changes the points already in it. Normal
noise is made from those uniforms by the Box-Muller transform.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["TOY_NAMES", "toy"]

TOY_NAMES = ("moons", "swissroll", "8gaussians", "checkerboard")

_ALIASES = {
    "moons": "moons",
    "twomoons": "moons",
    "swissroll": "swissroll",
    "8gaussians": "8gaussians",
    "eightgaussians": "8gaussians",
    "checkerboard": "checkerboard",
}

# Default noise (standard deviation, in output units) per set.
_DEFAULT_NOISE = {"moons": 0.1, "swissroll": 0.1, "8gaussians": math.sqrt(2.0) / 8.0, "checkerboard": 0.0}

MOONS_SCALE = math.sqrt(2.0)
MOONS_SHIFT = (0.5, 0.25)
SWISSROLL_SCALE = 7.0
GAUSSIANS_RADIUS = math.sqrt(2.0)


def _box_muller(u1, u2):
    """Two independent standard normals from two independent U[0, 1) arrays."""
    r = np.sqrt(-2.0 * np.log1p(-u1))  # 1 - u1 is in (0, 1]: log is finite
    return r * np.cos(2.0 * np.pi * u2), r * np.sin(2.0 * np.pi * u2)


def _canonical(name: str) -> str:
    key = str(name).lower().replace("_", "").replace("-", "").replace(" ", "")
    if key not in _ALIASES:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_NAMES)}")
    return _ALIASES[key]


def toy(name: str, n: int, seed: int = 0, *, noise: float | None = None, dtype=np.float32):
    """``n`` points of a 2-D toy distribution.

    Sets (``u`` uniform, ``z`` standard normal, ``noise`` the standard deviation of the
    added Gaussian noise in output units, default in brackets):

    - ``"moons"`` (0.1): scikit-learn's two moons. Class ``c ~ Bernoulli(1/2)``,
      ``t ~ U[0, pi]``; class 0 is the upper arc ``(cos t, sin t)``, class 1 the lower arc
      ``(1 - cos t, 1/2 - sin t)``; then ``sqrt(2) * (p - (1/2, 1/4)) + noise * z``.
      Labels: the class (0/1).
    - ``"swissroll"`` (0.1): the 2-D swiss roll of FFJORD (the ``(x, z)`` plane of
      scikit-learn's ``make_swiss_roll``): ``t = 3 pi / 2 (1 + 2u)``,
      ``p = t (cos t, sin t) / 7 + noise * z`` (7 ~ the RMS of ``t cos t``). Labels: None.
    - ``"8gaussians"`` (``sqrt(2)/8``): equal mixture of 8 Gaussians with means
      ``sqrt(2) (cos(k pi/4), sin(k pi/4))``, ``k = 0..7``, and standard deviation
      ``noise`` (FFJORD's set, radius 4 / 1.414 and std 0.5 / 1.414, halved). Labels: ``k``.
    - ``"checkerboard"`` (0): uniform on the 8 "black" squares of a 4x4 board of unit
      squares on ``[-2, 2)^2``, black meaning ``floor(x) + floor(y)`` even (FFJORD's
      construction, halved); plus ``noise * z`` if ``noise > 0``. Labels: None.

    Arguments:
      name: one of :data:`TOY_NAMES` (case, ``_`` and ``-`` ignored; ``two_moons`` and
        ``eight_gaussians`` also accepted).
      n: number of points.
      seed: non-negative int; same seed, same points (see the module docstring).
      noise: overrides the default noise level above.

    Returns:
      ``(points, labels)``: ``(n, 2)`` array of ``dtype`` and ``(n,)`` int32 or None.
    """
    name = _canonical(name)
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    noise = _DEFAULT_NOISE[name] if noise is None else float(noise)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    u = np.random.default_rng(seed).random((n, 5))
    zx, zy = _box_muller(u[:, 3], u[:, 4])
    labels = None
    if name == "moons":
        c = (u[:, 0] >= 0.5).astype(np.int32)
        t = np.pi * u[:, 1]
        x = np.where(c == 0, np.cos(t), 1.0 - np.cos(t))
        y = np.where(c == 0, np.sin(t), 0.5 - np.sin(t))
        x, y = MOONS_SCALE * (x - MOONS_SHIFT[0]), MOONS_SCALE * (y - MOONS_SHIFT[1])
        labels = c
    elif name == "swissroll":
        t = 1.5 * np.pi * (1.0 + 2.0 * u[:, 0])
        x, y = t * np.cos(t) / SWISSROLL_SCALE, t * np.sin(t) / SWISSROLL_SCALE
    elif name == "8gaussians":
        k = np.minimum((8 * u[:, 0]).astype(np.int32), 7)
        x, y = GAUSSIANS_RADIUS * np.cos(k * np.pi / 4), GAUSSIANS_RADIUS * np.sin(k * np.pi / 4)
        labels = k
    else:  # checkerboard
        x = 4.0 * u[:, 0] - 2.0
        y = u[:, 1] - 2.0 * (u[:, 2] >= 0.5) + np.mod(np.floor(x), 2.0)
    points = np.stack([x + noise * zx, y + noise * zy], axis=-1).astype(dtype)
    return points, labels
