"""jdiff.models._conv.conv_general_dilated: equal to ``lax.conv_general_dilated`` in
value, gradient, forward derivative and second derivative; its gradients are canonical
channel-last convolutions (the form XLA's CPU library kernels take, which XLA does not
produce itself inside a ``while`` body); the U-Net uses it.

Tolerances: inputs, tangents and cotangents are drawn in [0.5, 1.5], so every term of every
convolution sum is positive and each computed entry is within n * EPS64 relative error of the
exact value, n the longest reduction (at most 2 * 4 * 5 = 40 products here). Two computations
of the same quantity therefore agree to 2 n EPS64 relative.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS64
from jax import lax

from jdiff.models._conv import conv_general_dilated as conv

CANONICAL_2D = "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"

# (x shape, w shape, strides, padding, extra lax arguments)
CASES = {
    "3x3 same": ((2, 7, 6, 3), (3, 3, 3, 4), (1, 1), "SAME", {}),
    "3x3 stride 2 odd size": ((2, 7, 9, 3), (3, 3, 3, 2), (2, 2), ((1, 1), (1, 1)), {}),
    "3x2 strides 2,1 uneven pads": ((1, 8, 8, 2), (3, 2, 2, 3), (2, 1), ((0, 2), (1, 0)), {}),
}


def _positive(key, shape):
    return jax.random.uniform(key, shape, jnp.float64, 0.5, 1.5)


def _derivatives(f, x, w, dx, dw, c):
    """Value, reverse mode (input and kernel gradients), forward mode (used through the
    denoiser by jdiff.likelihood and DPM-Solver-v3) and forward over reverse of <c, f>."""
    y, vjp = jax.vjp(f, x, w)
    grad = jax.grad(lambda x, w: jnp.vdot(c, f(x, w)), argnums=(0, 1))
    return (y, *vjp(c), jax.jvp(f, (x, w), (dx, dw))[1], *jax.jvp(grad, (x, w), (dx, dw))[1])


def _case_arrays(i, xs, ws, yshape):
    ks = jax.random.split(jax.random.key(i), 5)
    return tuple(_positive(k, s) for k, s in zip(ks, (xs, ws, xs, ws, yshape)))


def _kwargs(xs, extra):
    kw = dict(extra)
    kw.setdefault("dimension_numbers", ("NWC", "WIO", "NWC") if len(xs) == 3 else ("NHWC", "HWIO", "NHWC"))
    return kw


VMAP_CASE = "3x3 stride 2 odd size"


@pytest.fixture(scope="module")
def all_cases(x64):
    """Every case's derivatives by both functions, and the vmapped gradients, in one
    compiled program (compilation dominates)."""

    def run():
        out, arrays = {}, {}
        for i, (name, (xs, ws, strides, padding, extra)) in enumerate(CASES.items()):
            kw = _kwargs(xs, extra)
            ours = lambda x, w, kw=kw, s=strides, p=padding: conv(x, w, s, p, **kw)
            ref = lambda x, w, kw=kw, s=strides, p=padding: lax.conv_general_dilated(x, w, s, p, **kw)
            yshape = jax.eval_shape(ref, jnp.zeros(xs), jnp.zeros(ws)).shape
            arrays[name] = _case_arrays(i, xs, ws, yshape)
            out[name] = (_derivatives(ours, *arrays[name]), _derivatives(ref, *arrays[name]))
        # vmap of the gradient, with a shared kernel (folded into the batch) and per-example kernels
        xs, ws, strides, padding, _ = CASES[VMAP_CASE]
        xb, wb = _positive(jax.random.key(99), (3, *xs)), _positive(jax.random.key(98), (3, *ws))

        def grads(f):
            loss = lambda x, w: jnp.sum(f(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")))
            g = jax.grad(loss, argnums=(0, 1))
            return jax.vmap(g, in_axes=(0, None))(xb, wb[0]), jax.vmap(g)(xb, wb)

        out["vmap"] = (grads(conv), grads(lax.conv_general_dilated))
        return out, arrays

    return jax.jit(run)()


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_derivatives_equal_lax(all_cases, name):
    results, arrays = all_cases
    ours, ref = results[name]
    x, w, _, _, c = arrays[name]
    # longest sum: the kernel gradient's (batch x output positions) or a forward output's
    n = max(c.shape[0] * int(np.prod(c.shape[1:-1])), int(np.prod(w.shape)))
    names = ["value", "input gradient", "kernel gradient", "jvp", "d(input gradient)", "d(kernel gradient)"]
    for what, got, want in zip(names, ours, ref):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2 * n * EPS64, atol=0, err_msg=what)


def test_vmap_of_gradient(all_cases):
    got, want = all_cases[0]["vmap"]
    xs = CASES[VMAP_CASE][0]
    n = xs[0] * 4 * 5  # kernel gradient: batch x 4 x 5 output positions
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2 * n * EPS64, atol=0)


def _scan_gradient(f):
    """Gradient w.r.t. the kernels and the state of a 2-step scan of a stride-1 and a
    stride-2 convolution (the layers of the U-Net), as a jitted function and its inputs."""
    w1 = jnp.full((3, 3, 2, 2), 0.1)
    w2 = jnp.full((3, 3, 2, 2), 0.1)
    x = jnp.ones((2, 8, 8, 2))
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(w1, w2, x):
        def body(x, _):
            h = jnp.tanh(f(x, w1, (1, 1), "SAME", dimension_numbers=dn))
            h = f(h, w2, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
            return x + jnp.repeat(jnp.repeat(h, 2, 1), 2, 2), None

        return jnp.sum(lax.scan(body, x, None, length=2)[0] ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (w1, w2, x)


def _dim_numbers(text):
    return re.findall(r"dim_numbers = (\[[^\]]*\]x\[[^\]]*\]->\[[^\]]*\])", text)


def test_gradient_convolutions_are_canonical_inside_scan():
    """On CPU every convolution of the gradient program, forward and backward, is in the
    canonical form. JAX's own transpose rules are not (the kernel gradient contracts the
    batch as a feature), which is what the CPU backend runs ~15x slower in a loop body."""
    g, args = _scan_gradient(conv)
    dims = _dim_numbers(g.lower(*args).as_text())
    assert len(dims) == 6, dims  # 2 forward, 2 input gradients, 2 kernel gradients
    assert set(dims) == {CANONICAL_2D}, dims
    g, args = _scan_gradient(lax.conv_general_dilated)
    assert set(_dim_numbers(g.lower(*args).as_text())) != {CANONICAL_2D}


def test_other_platforms_keep_jax_transposes():
    """The canonical rewrite is CPU-only: lowered for CUDA, the gradient program has the same
    convolutions as with ``lax.conv_general_dilated``."""
    ours, args = _scan_gradient(conv)
    ref, _ = _scan_gradient(lax.conv_general_dilated)

    def cuda_dims(g):
        return sorted(_dim_numbers(jax.export.export(g, platforms=("cuda",))(*args).mlir_module()))

    assert cuda_dims(ours) == cuda_dims(ref)


def test_unet_uses_it():
    from flax import nnx

    from jdiff.models import _unet

    layer = nnx.eval_shape(lambda: _unet._conv(2, 3, 3, _unet.UNetConfig(), nnx.Rngs(0)))
    assert layer.conv_general_dilated is conv
