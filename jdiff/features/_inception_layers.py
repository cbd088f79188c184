"""The layers of the FID InceptionV3 (:mod:`jdiff.features.inception`): ``BasicConv2d``
(convolution, batch norm with ``eps = 0.001``, ReLU), the fully connected layer, the
pools as pytorch-fid computes them, and the Inception A-E blocks. Attribute names follow
torchvision's, so every parameter's NNX path is its PyTorch state-dict name."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_BN_EPS = 1e-3


def _zeros(shape):
    # Host zeros moved to the device: no per-shape compiled initializer (building the
    # network's ~100 layers with jax.random initializers takes minutes on a small CPU).
    return jnp.asarray(np.zeros(shape, np.float32))


class BasicConv2d(nnx.Module):
    """Bias-free convolution, batch norm with running statistics (``eps = 0.001``), ReLU.

    Variables: ``kernel`` (HWIO), ``scale``/``bias`` (the batch norm's affine ``weight``/
    ``bias``) and the ``nnx.BatchStat`` ``mean``/``var``; all zero until weights are
    loaded.
    """

    def __init__(self, cin, cout, kernel, *, stride=1, padding=0, precision=None):
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.stride = int(stride)
        self.padding = ((padding[0], padding[0]), (padding[1], padding[1]))
        self.precision = precision
        self.kernel = nnx.Param(_zeros(kernel + (cin, cout)))
        self.scale = nnx.Param(_zeros((cout,)))
        self.bias = nnx.Param(_zeros((cout,)))
        self.mean = nnx.BatchStat(_zeros((cout,)))
        self.var = nnx.BatchStat(_zeros((cout,)))

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...],
            (self.stride, self.stride),
            self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        # Inference batch norm as one multiply-add per element, as PyTorch's CPU kernel:
        # y * a + b with a = scale / sqrt(var + eps), b = bias - mean * a.
        a = self.scale[...] * jax.lax.rsqrt(self.var[...] + _BN_EPS)
        b = self.bias[...] - self.mean[...] * a
        return jax.nn.relu(y * a + b)


class Linear(nnx.Module):
    """``x @ kernel + bias`` (kernel ``(in, out)``), zero until weights are loaded."""

    def __init__(self, cin, cout, *, precision=None):
        self.precision = precision
        self.kernel = nnx.Param(_zeros((cin, cout)))
        self.bias = nnx.Param(_zeros((cout,)))

    def __call__(self, x):
        return jnp.dot(x, self.kernel[...], precision=self.precision) + self.bias[...]


def _max_pool(x, size, stride, pad=0):
    """``F.max_pool2d(x, size, stride, pad)`` on NHWC: padding never wins a max."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0))
    )


def _avg_pool_3x3_exclude_pad(x):
    """``F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)`` on NHWC: each
    window's sum divided by the number of its positions inside the image."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return total / count


def _cat(xs):
    return jnp.concatenate(xs, axis=-1)


class InceptionA(nnx.Module):
    """pytorch-fid's ``FIDInceptionA`` (torchvision's InceptionA, pad-excluding avg pool)."""

    def __init__(self, cin, pool_features, *, precision=None):
        c = partial(BasicConv2d, precision=precision)
        self.branch1x1 = c(cin, 64, 1)
        self.branch5x5_1 = c(cin, 48, 1)
        self.branch5x5_2 = c(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = c(cin, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, padding=1)
        self.branch_pool = c(cin, pool_features, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return _cat([b1, b5, b3, bp])


class InceptionB(nnx.Module):
    """torchvision's InceptionB (``Mixed_6a``): stride-2 reduction 35 -> 17."""

    def __init__(self, cin, *, precision=None):
        c = partial(BasicConv2d, precision=precision)
        self.branch3x3 = c(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = c(cin, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return _cat([b3, bd, _max_pool(x, 3, 2)])


class InceptionC(nnx.Module):
    """pytorch-fid's ``FIDInceptionC``: factorized 7x7 branches, pad-excluding avg pool."""

    def __init__(self, cin, c7, *, precision=None):
        c = partial(BasicConv2d, precision=precision)
        self.branch1x1 = c(cin, 192, 1)
        self.branch7x7_1 = c(cin, c7, 1)
        self.branch7x7_2 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = c(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = c(cin, c7, 1)
        self.branch7x7dbl_2 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = c(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = c(cin, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return _cat([b1, b7, bd, bp])


class InceptionD(nnx.Module):
    """torchvision's InceptionD (``Mixed_7a``): stride-2 reduction 17 -> 8."""

    def __init__(self, cin, *, precision=None):
        c = partial(BasicConv2d, precision=precision)
        self.branch3x3_1 = c(cin, 192, 1)
        self.branch3x3_2 = c(192, 320, 3, stride=2)
        self.branch7x7x3_1 = c(cin, 192, 1)
        self.branch7x7x3_2 = c(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = c(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = c(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return _cat([b3, b7, _max_pool(x, 3, 2)])


class InceptionE(nnx.Module):
    """pytorch-fid's ``FIDInceptionE_1`` (``pool="avg"``, pad-excluding) or
    ``FIDInceptionE_2`` (``pool="max"``, the TF graph's max pool in ``Mixed_7c``)."""

    def __init__(self, cin, pool, *, precision=None):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        c = partial(BasicConv2d, precision=precision)
        self.branch1x1 = c(cin, 320, 1)
        self.branch3x3_1 = c(cin, 384, 1)
        self.branch3x3_2a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = c(cin, 448, 1)
        self.branch3x3dbl_2 = c(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = c(cin, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = _cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)])
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = _cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)])
        pooled = _avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else _max_pool(x, 3, 1, 1)
        return _cat([b1, b3, bd, self.branch_pool(pooled)])
