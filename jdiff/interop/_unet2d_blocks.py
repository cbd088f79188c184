"""The blocks of diffusers' ``UNet2DModel`` as NNX modules in NHWC, each with a ``load``
that takes its tensors from a :class:`~jdiff.interop.Weights` under diffusers' key names.

The blocks are those of DDPM (Ho et al., "Denoising Diffusion Probabilistic Models",
NeurIPS 2020, App. B; the Wide-ResNet / PixelCNN++ U-Net) in diffusers' formulation:

- residual block: ``h = conv1(act(GN1(x)))`` (with 2x nearest upsampling or 2x2 average
  pooling of both ``x`` and ``h`` before ``conv1`` in a resampling block), then
  ``h = act(GN2(h + W act(e)))`` (``"default"``) or ``act(GN2(h) (1 + s) + b)`` with
  ``(s, b) = W act(e)`` (``"scale_shift"``, the adaptive group norm of Dhariwal & Nichol,
  2021), then ``conv2``; the output is ``(shortcut(x) + h) / output_scale_factor`` with a
  1x1 convolution as shortcut where the channel count changes;
- attention block: ``(x + proj(MHA(q, k, v of GN(x)))) / rescale_output_factor`` over the
  ``H * W`` positions, softmax over ``q k / sqrt(head_dim)`` in float32;
- downsampling: a stride-2 3x3 convolution with ``padding`` on each side, or (padding 0)
  a zero row and column added at the bottom and right only, as diffusers does;
- upsampling: 2x nearest neighbour followed by a 3x3 convolution.

Normalizations, the softmax and the time features are computed in float32 whatever the
compute ``dtype`` (as in :mod:`jdiff.models`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdiff.interop._convert import Weights
from jdiff.models._common import attention
from jdiff.models._conv import conv_general_dilated

__all__ = [
    "ACTIVATIONS",
    "Attention",
    "DownBlock",
    "Downsample",
    "GroupNorm",
    "MidBlock",
    "ResnetBlock",
    "UpBlock",
    "Upsample",
    "conv",
    "load_conv",
    "load_linear",
    "put",
]

# diffusers' get_activation names; torch's GELU is the exact (erf) one.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def put(var: nnx.Variable, value) -> None:
    """Set a parameter (possibly abstract, from ``nnx.eval_shape``) to ``value`` in its dtype."""
    var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))


def conv(cin: int, cout: int, k: int, *, dtype, param_dtype, rngs, stride: int = 1, padding=None) -> nnx.Conv:
    """A ``k x k`` NHWC convolution (HWIO kernel) with explicit ``((top, bottom), (left, right))``
    padding (default ``k // 2`` on every side)."""
    pad = ((k // 2, k // 2),) * 2 if padding is None else padding
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(k, k),
        strides=(stride, stride),
        padding=pad,
        dtype=dtype,
        param_dtype=param_dtype,
        conv_general_dilated=conv_general_dilated,  # fast gradients inside lax.scan on CPU
        rngs=rngs,
    )


def load_conv(m: nnx.Conv, w: Weights, prefix: str) -> None:
    cin, cout = m.in_features, m.out_features
    kernel, bias = w.conv(prefix, cin, cout, m.kernel_size[0])
    put(m.kernel, kernel)
    put(m.bias, bias)


def load_linear(m: nnx.Linear, w: Weights, prefix: str) -> None:
    kernel, bias = w.linear(prefix, m.in_features, m.out_features)
    put(m.kernel, kernel)
    put(m.bias, bias)


class GroupNorm(nnx.Module):
    """GroupNorm over the channels of NHWC (or ``(B, N, C)``) input, computed in float32
    (two-pass variance, as torch) and returned in the compute dtype."""

    def __init__(self, channels: int, groups: int, eps: float, *, dtype, param_dtype, rngs):
        self.channels = channels
        self.gn = nnx.GroupNorm(
            channels,
            num_groups=groups,
            epsilon=eps,
            dtype=jnp.float32,
            param_dtype=param_dtype,
            use_fast_variance=False,
            rngs=rngs,
        )
        self.dtype = dtype or jnp.float32

    def __call__(self, x):
        return self.gn(x.astype(jnp.float32)).astype(self.dtype)

    def load(self, w: Weights, prefix: str) -> None:
        scale, bias = w.norm(prefix, self.channels)
        put(self.gn.scale, scale)
        put(self.gn.bias, bias)


def _up(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResnetBlock(nnx.Module):
    """diffusers' ``ResnetBlock2D`` (see the module docstring); ``resample`` is None,
    ``"up"`` or ``"down"`` (the ``upsample_type`` / ``downsample_type`` ``"resnet"``)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        temb: int,
        *,
        groups: int,
        eps: float,
        act: str,
        scale_shift: bool,
        output_scale_factor: float,
        resample: str | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cin, self.cout = cin, cout
        self.act = ACTIVATIONS[act]
        self.scale_shift = scale_shift
        self.output_scale_factor = output_scale_factor
        self.resample = resample
        self.norm1 = GroupNorm(cin, groups, eps, **kw)
        self.conv1 = conv(cin, cout, 3, **kw)
        self.time_emb_proj = nnx.Linear(temb, cout * (2 if scale_shift else 1), **kw)
        self.norm2 = GroupNorm(cout, groups, eps, **kw)
        self.conv2 = conv(cout, cout, 3, **kw)
        self.conv_shortcut = conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x, emb):
        h = self.act(self.norm1(x))
        if self.resample == "up":
            x, h = _up(x), _up(h)
        elif self.resample == "down":
            x, h = _avg_pool(x), _avg_pool(h)
        h = self.conv1(h)
        e = self.time_emb_proj(self.act(emb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e.astype(jnp.float32), 2, axis=-1)
            h = self.norm2(h).astype(jnp.float32) * (1.0 + scale) + shift
            h = h.astype(self.norm2.dtype)
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.act(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out

    def load(self, w: Weights, prefix: str) -> None:
        self.norm1.load(w, f"{prefix}.norm1")
        load_conv(self.conv1, w, f"{prefix}.conv1")
        load_linear(self.time_emb_proj, w, f"{prefix}.time_emb_proj")
        self.norm2.load(w, f"{prefix}.norm2")
        load_conv(self.conv2, w, f"{prefix}.conv2")
        if self.conv_shortcut is not None:
            load_conv(self.conv_shortcut, w, f"{prefix}.conv_shortcut")


# diffusers renames the attention projections of checkpoints saved before its
# Attention class (``_from_deprecated_attn_block``); such files still carry the old names.
_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


class Attention(nnx.Module):
    """Self-attention over the ``H * W`` positions of an NHWC map with a residual
    connection (diffusers' ``Attention`` as its U-Net blocks configure it).

    ``heads = channels // head_dim`` heads of ``head_dim`` channels; ``groups`` None means
    no group norm before the projections (the middle block's attention under
    ``scale_shift`` unless ``attn_norm_num_groups`` is set)."""

    def __init__(
        self,
        channels: int,
        head_dim: int,
        *,
        groups: int | None,
        eps: float,
        rescale: float,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = channels // head_dim
        self.head_dim = head_dim
        inner = self.heads * head_dim
        self.rescale = rescale
        self.group_norm = GroupNorm(channels, groups, eps, **kw) if groups else None
        self.to_q = nnx.Linear(channels, inner, **kw)
        self.to_k = nnx.Linear(channels, inner, **kw)
        self.to_v = nnx.Linear(channels, inner, **kw)
        self.to_out = nnx.Linear(inner, channels, **kw)

    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = x.reshape(b, hh * ww, c)
        if self.group_norm is not None:
            h = self.group_norm(h)
        split = (b, hh * ww, self.heads, self.head_dim)
        q, k, v = (f(h).reshape(split) for f in (self.to_q, self.to_k, self.to_v))
        a = attention(q, k, v).reshape(b, hh * ww, self.heads * self.head_dim)
        out = x + self.to_out(a).reshape(b, hh, ww, c)
        return out / self.rescale if self.rescale != 1.0 else out

    def load(self, w: Weights, prefix: str) -> None:
        if self.group_norm is not None:
            self.group_norm.load(w, f"{prefix}.group_norm")
        legacy = f"{prefix}.to_q.weight" not in w and f"{prefix}.query.weight" in w
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            m = getattr(self, name.split(".")[0])
            load_linear(m, w, f"{prefix}.{_LEGACY[name] if legacy else name}")


class Downsample(nnx.Module):
    """A stride-2 3x3 convolution (diffusers' ``Downsample2D`` with ``use_conv``): ``padding``
    zeros on each side, or with ``padding`` 0 one zero row/column at the bottom/right."""

    def __init__(self, channels: int, padding: int, *, dtype, param_dtype, rngs):
        pad = ((0, 1), (0, 1)) if padding == 0 else ((padding, padding),) * 2
        self.conv = conv(channels, channels, 3, stride=2, padding=pad, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, emb=None):
        return self.conv(x)

    def load(self, w: Weights, prefix: str) -> None:
        load_conv(self.conv, w, f"{prefix}.conv")


class Upsample(nnx.Module):
    """2x nearest-neighbour upsampling followed by a 3x3 convolution (``Upsample2D``)."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, emb=None):
        return self.conv(_up(x))

    def load(self, w: Weights, prefix: str) -> None:
        load_conv(self.conv, w, f"{prefix}.conv")


class DownBlock(nnx.Module):
    """``DownBlock2D`` / ``AttnDownBlock2D``: ``layers`` residual blocks (each followed by
    attention when ``head_dim`` is set), then an optional downsampler (``"conv"`` or
    ``"resnet"``). Returns the output and the activations it hands to the skip connections
    (each layer's output, and the downsampler's)."""

    def __init__(self, cin, cout, temb, *, layers, head_dim, downsample, padding, res, attn, rngs):
        ins = [cin] + [cout] * (layers - 1)
        self.resnets = nnx.List([ResnetBlock(c, cout, temb, **res, rngs=rngs) for c in ins])
        self.attentions = (
            nnx.List([Attention(cout, head_dim, **attn, rngs=rngs) for _ in range(layers)]) if head_dim else None
        )
        kw = dict(dtype=res["dtype"], param_dtype=res["param_dtype"], rngs=rngs)
        if downsample == "conv":
            self.downsampler = Downsample(cout, padding, **kw)
        elif downsample == "resnet":
            self.downsampler = ResnetBlock(cout, cout, temb, **res, resample="down", rngs=rngs)
        else:
            self.downsampler = None

    def __call__(self, x, emb):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsampler is not None:
            x = self.downsampler(x, emb)
            skips.append(x)
        return x, skips

    def load(self, w: Weights, prefix: str) -> None:
        for i, resnet in enumerate(self.resnets):
            resnet.load(w, f"{prefix}.resnets.{i}")
            if self.attentions is not None:
                self.attentions[i].load(w, f"{prefix}.attentions.{i}")
        if self.downsampler is not None:
            self.downsampler.load(w, f"{prefix}.downsamplers.0")


class UpBlock(nnx.Module):
    """``UpBlock2D`` / ``AttnUpBlock2D``: ``len(skip_channels)`` residual blocks, each on
    the channel concatenation of the running activation and the last unconsumed skip
    activation (each followed by attention when ``head_dim`` is set), then an optional
    upsampler (``"conv"`` or ``"resnet"``)."""

    def __init__(self, cin, cout, skip_channels, temb, *, head_dim, upsample, res, attn, rngs):
        ins = [cin] + [cout] * (len(skip_channels) - 1)
        self.resnets = nnx.List(
            [ResnetBlock(i + s, cout, temb, **res, rngs=rngs) for i, s in zip(ins, skip_channels, strict=True)]
        )
        self.attentions = (
            nnx.List([Attention(cout, head_dim, **attn, rngs=rngs) for _ in skip_channels]) if head_dim else None
        )
        kw = dict(dtype=res["dtype"], param_dtype=res["param_dtype"], rngs=rngs)
        if upsample == "conv":
            self.upsampler = Upsample(cout, **kw)
        elif upsample == "resnet":
            self.upsampler = ResnetBlock(cout, cout, temb, **res, resample="up", rngs=rngs)
        else:
            self.upsampler = None

    def __call__(self, x, skips, emb):
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), emb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        return x if self.upsampler is None else self.upsampler(x, emb)

    def load(self, w: Weights, prefix: str) -> None:
        for i, resnet in enumerate(self.resnets):
            resnet.load(w, f"{prefix}.resnets.{i}")
            if self.attentions is not None:
                self.attentions[i].load(w, f"{prefix}.attentions.{i}")
        if self.upsampler is not None:
            self.upsampler.load(w, f"{prefix}.upsamplers.0")


class MidBlock(nnx.Module):
    """``UNetMidBlock2D`` with one layer: residual block, attention (unless
    ``add_attention`` is false), residual block."""

    def __init__(self, channels, temb, *, head_dim, attn_groups, add_attention, res, attn, rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, temb, **res, rngs=rngs) for _ in range(2)])
        attn = dict(attn, groups=attn_groups)
        self.attention = Attention(channels, head_dim, **attn, rngs=rngs) if add_attention else None

    def __call__(self, x, emb):
        x = self.resnets[0](x, emb)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x, emb)

    def load(self, w: Weights, prefix: str) -> None:
        self.resnets[0].load(w, f"{prefix}.resnets.0")
        if self.attention is not None:
            self.attention.load(w, f"{prefix}.attentions.0")
        self.resnets[1].load(w, f"{prefix}.resnets.1")
