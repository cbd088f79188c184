"""A convolution whose gradients stay fast inside XLA CPU ``while`` loops.

XLA's CPU backend runs a convolution on its fast library kernels (Eigen, YNNPACK) only when
the convolution is in canonical form: input ``(N, *spatial, C)``, kernel
``(*spatial, I, O)``, output ``(N, *spatial, C)``. Its ``ConvCanonicalization`` pass
rewrites other convolutions into that form with explicit transposes, but it visits only
the entry computation (xla/service/cpu/conv_canonicalization.cc), so a non-canonical
convolution inside a ``while`` body (``lax.scan``, ``fori_loop``) is left to the generic
emitted loop nest. JAX's transpose rules for ``conv_general_dilated`` produce exactly such
convolutions: the kernel gradient is ``f01b_i01o->01bf`` (the batch is contracted as the
feature dimension) and the input gradient uses the flipped kernel with its ``I`` and ``O``
swapped. So the parameter gradient of a convolutional denoiser differentiated through the
sampler's scan ran about 15x slower than the same program unrolled (measured in
``benchmarks/RESULTS.md``; upstream report: jax-ml/jax#12868, "Convolution is
significantly slower inside a loop body (CPU)", open).

:func:`conv_general_dilated` here computes the same convolution as a bilinear primitive (like
``lax.conv_general_dilated_p``, lowered to the same HLO convolution) whose two transpose
rules build the input and kernel gradients as canonical convolutions themselves: the kernel gradient
convolves the input, laid out ``(C, *spatial, N)``, with the output cotangent laid out
``(*spatial, N, O)`` as a kernel dilated by the stride; the input gradient convolves the
stride-dilated cotangent with the spatially flipped kernel transposed to
``(*spatial, O, I)``. These are the usual formulas (e.g. Dumoulin and Visin, "A guide to
convolution arithmetic for deep learning", 2016, section 4), only written in the layout
the CPU kernels accept. The canonical path is lowered on the CPU platform only
(``lax.platform_dependent``); elsewhere the transposes are JAX's own. Forward mode
(``jax.jvp``, used through the denoiser by :mod:`jdiff.likelihood` and DPM-Solver-v3),
``vmap`` and higher-order derivatives work as for ``lax.conv_general_dilated``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["conv_general_dilated"]


def _channel_last(nd: int) -> lax.ConvDimensionNumbers:
    space = tuple(range(1, nd + 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, nd + 1, *space), rhs_spec=(nd + 1, nd, *range(nd)), out_spec=(0, nd + 1, *space)
    )


def _plain(x, w, strides, padding, precision):
    return lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=_channel_last(x.ndim - 2), precision=precision
    )


def _plain_kw(x, w, *, strides, padding, precision):
    return _plain(x, w, strides, padding, precision)


def _kernel_grad_canonical(x, ct, kshape, strides, padding, precision):
    # dW[k, i, o] = sum_{b, q} x[b, s q + k - lo, i] ct[b, q, o]: a convolution of x viewed as
    # (batch=i, spatial, feature=b) with ct viewed as a kernel (spatial, in=b, out=o) whose
    # taps sit s apart (kernel dilation s). Output spatial size = kernel size fixes `hi`.
    nd = x.ndim - 2
    pads = [
        (lo, k + s * (m - 1) - n - lo)
        for (lo, _), k, s, m, n in zip(padding, kshape[:nd], strides, ct.shape[1:-1], x.shape[1:-1])
    ]
    lhs = jnp.moveaxis(x, (0, -1), (-1, 0))
    rhs = jnp.moveaxis(ct.astype(x.dtype), 0, -2)
    out = lax.conv_general_dilated(
        lhs, rhs, (1,) * nd, pads, rhs_dilation=strides, dimension_numbers=_channel_last(nd), precision=precision
    )
    return jnp.moveaxis(out, 0, -2)


def _input_grad_canonical(w, ct, xshape, strides, padding, precision):
    # dx[b, p, i] = sum_{q, k: s q + k - lo = p} ct[b, q, o] W[k, i, o]: the stride-dilated ct
    # correlated with the flipped kernel, padded so that the output has the input's size.
    nd = w.ndim - 2
    kshape = w.shape[:nd]
    pads = [
        (k - 1 - lo, n - 1 - s * (m - 1) + lo)
        for (lo, _), k, s, m, n in zip(padding, kshape, strides, ct.shape[1:-1], xshape[1:-1])
    ]
    wt = jnp.swapaxes(jnp.flip(w, axis=tuple(range(nd))), -1, -2)
    return lax.conv_general_dilated(
        ct.astype(w.dtype),
        wt,
        (1,) * nd,
        pads,
        lhs_dilation=strides,
        dimension_numbers=_channel_last(nd),
        precision=precision,
    )


def _operand_grad(other, ct, shape, dtype, plain, canonical):
    """The cotangent of one operand of shape ``shape``: JAX's own transpose of
    ``plain(operand, other)`` by default, the canonical convolution ``canonical(other, ct)``
    on CPU."""

    def jax_rule(other, ct):
        (d,) = jax.linear_transpose(lambda z: plain(z, other), jax.ShapeDtypeStruct(shape, dtype))(ct)
        return d

    def cpu_rule(other, ct):
        return canonical(other, ct).astype(dtype)

    return lax.platform_dependent(other, ct, cpu=cpu_rule, default=jax_rule)


def _lhs_transpose(ct, x, w, *, strides, padding, precision):
    shape = x.aval.shape
    return _operand_grad(
        w,
        ct,
        shape,
        x.aval.dtype,
        lambda x, w: _plain(x, w, strides, padding, precision),
        lambda w, ct: _input_grad_canonical(w, ct, shape, strides, padding, precision),
    )


def _rhs_transpose(ct, x, w, *, strides, padding, precision):
    shape = w.aval.shape
    return _operand_grad(
        x,
        ct,
        shape,
        w.aval.dtype,
        lambda w, x: _plain(x, w, strides, padding, precision),
        lambda x, ct: _kernel_grad_canonical(x, ct, shape, strides, padding, precision),
    )


def _abstract_eval(x, w, *, strides, padding, precision):
    out = jax.eval_shape(partial(_plain, strides=strides, padding=padding, precision=precision), x, w)
    return ShapedArray(out.shape, out.dtype)


def _batch(args, dims, *, strides, padding, precision):
    x, w = args
    bx, bw = dims
    if bw is None:  # unmapped kernel: fold the mapped axis into the batch
        x = jnp.moveaxis(x, bx, 0)
        y = _conv_p.bind(x.reshape(-1, *x.shape[2:]), w, strides=strides, padding=padding, precision=precision)
        return y.reshape(x.shape[0], -1, *y.shape[1:]), 0
    # per-example kernels: JAX's own batched convolution (correct, without the fast gradient)
    f = partial(_plain, strides=strides, padding=padding, precision=precision)
    return jax.vmap(f, in_axes=(bx, bw))(x, w), 0


# A bilinear primitive, like lax.conv_general_dilated_p, whose two transposes are the
# canonical convolutions above: its JVP is itself applied to the tangents (ad.defbilinear),
# so forward mode and higher derivatives work; the transposes are ordinary lax code.
_conv_p = Primitive("jdiff_channel_last_conv")
_conv_p.def_impl(_plain_kw)
_conv_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_conv_p, mlir.lower_fun(_plain_kw, multiple_results=False))
ad.defbilinear(_conv_p, _lhs_transpose, _rhs_transpose)
batching.primitive_batchers[_conv_p] = _batch


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    **kwargs,
):
    """Drop-in replacement for :func:`jax.lax.conv_general_dilated` (same arguments and
    values) whose gradients are canonical CPU convolutions, so that differentiating a
    convolutional network inside ``lax.scan`` on the CPU runs on XLA's library kernels.

    The fast path covers what the jdiff U-Net uses: channel-last input and output with an
    ``(*spatial, I, O)`` kernel (flax's ``NHWC``/``HWIO``), any stride and explicit or
    named padding, no input or kernel dilation, one feature and batch group, and no
    ``preferred_element_type`` or other keyword. Any other call is passed to
    :func:`jax.lax.conv_general_dilated` unchanged. Pass it as ``conv_general_dilated=`` to
    :class:`flax.nnx.Conv`.

    Why: XLA's CPU convolution canonicalization skips ``while`` bodies (see the module
    docstring and jax-ml/jax#12868); the kernel and input gradients are the standard
    transposed-convolution formulas (Dumoulin and Visin, 2016, arXiv:1603.07285).

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type, kwargs:
        as for :func:`jax.lax.conv_general_dilated`.

    Returns:
      The convolution, equal to :func:`jax.lax.conv_general_dilated`'s.

    Raises:
      Whatever :func:`jax.lax.conv_general_dilated` raises for invalid arguments.
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    nd = lhs.ndim - 2
    plain = partial(
        lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )
    if (
        nd < 1
        or rhs.ndim != lhs.ndim
        or any(v is not None for v in kwargs.values())
        or preferred_element_type is not None
        or feature_group_count != 1
        or batch_group_count != 1
        or any(d != 1 for d in (lhs_dilation or ()))
        or any(d != 1 for d in (rhs_dilation or ()))
        or len(window_strides) != nd
        or lhs.dtype != rhs.dtype
    ):
        return plain()
    try:
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    except (TypeError, ValueError):
        return plain()
    if dn != _channel_last(nd):
        return plain()
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:nd], strides, padding)
    else:
        pads = [tuple(p) for p in padding]
    if len(pads) != nd or any(len(p) != 2 for p in pads):
        return plain()
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if lhs.shape[-1] != rhs.shape[-2]:
        return plain()  # lax raises the clear shape error
    return _conv_p.bind(lhs, rhs, strides=strides, padding=pads, precision=precision)
