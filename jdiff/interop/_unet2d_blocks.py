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
compute ``dtype`` (as in :mod:`jdiff.models`). The layers (:class:`Linear`, :class:`Conv`,
:class:`GroupNorm`) take their parameters from an :class:`Init`: random values drawn on
the host, or shape-only placeholders that ``load`` replaces, so that loading a checkpoint
neither draws random weights nor traces the constructor.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdiff.interop._convert import Weights
from jdiff.models._common import attention
from jdiff.models._conv import conv_general_dilated

__all__ = [
    "ACTIVATIONS",
    "Attention",
    "Conv",
    "DownBlock",
    "Downsample",
    "GroupNorm",
    "Init",
    "Linear",
    "MidBlock",
    "ResnetBlock",
    "UpBlock",
    "Upsample",
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


class Init:
    """Where parameters come from when a module is built.

    ``rng`` a NumPy generator: random values drawn on the host (weights normal with
    standard deviation ``1/sqrt(fan_in)``, biases 0, norm scales 1), so building a large
    model compiles nothing. ``rng`` None: shape-only placeholders that ``load`` replaces
    with a checkpoint's tensors (no memory, no random draws).
    """

    def __init__(self, rng: np.random.Generator | None, param_dtype: Any = jnp.float32, dtype: Any = None):
        self.rng = rng
        self.param_dtype = param_dtype
        self.dtype = dtype or jnp.float32  # the compute dtype of the layers built

    def _param(self, shape, draw) -> nnx.Param:
        if self.rng is None:
            return nnx.Param(jax.ShapeDtypeStruct(tuple(shape), self.param_dtype))
        return nnx.Param(jnp.asarray(draw(), dtype=self.param_dtype))

    def normal(self, shape, std: float) -> nnx.Param:
        return self._param(shape, lambda: self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def const(self, shape, value: float) -> nnx.Param:
        return self._param(shape, lambda: np.full(shape, value, np.float32))


def put(var: nnx.Variable, value) -> None:
    """Set a parameter (possibly a placeholder) to ``value`` in the parameter's dtype."""
    var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))


class Linear(nnx.Module):
    """``x @ kernel + bias`` with kernel ``(d_in, d_out)`` (a ``torch.nn.Linear``)."""

    def __init__(self, d_in: int, d_out: int, init: Init):
        self.d_in, self.d_out, self.dtype = d_in, d_out, init.dtype
        self.kernel = init.normal((d_in, d_out), d_in**-0.5)
        self.bias = init.const((d_out,), 0.0)

    def __call__(self, x):
        dt = self.dtype
        return jnp.dot(x.astype(dt), self.kernel[...].astype(dt)) + self.bias[...].astype(dt)

    def load(self, w: Weights, prefix: str) -> None:
        kernel, bias = w.linear(prefix, self.d_in, self.d_out)
        put(self.kernel, kernel)
        put(self.bias, bias)


class Conv(nnx.Module):
    """A ``k x k`` NHWC convolution with an HWIO kernel and explicit
    ``((top, bottom), (left, right))`` padding (default ``k // 2`` on every side)."""

    def __init__(self, cin: int, cout: int, k: int, init: Init, *, stride: int = 1, padding=None):
        self.cin, self.cout, self.k, self.stride, self.dtype = cin, cout, k, stride, init.dtype
        self.padding = ((k // 2, k // 2),) * 2 if padding is None else tuple(tuple(p) for p in padding)
        self.kernel = init.normal((k, k, cin, cout), (k * k * cin) ** -0.5)
        self.bias = init.const((cout,), 0.0)

    def __call__(self, x):
        dt = self.dtype
        y = conv_general_dilated(  # fast gradients inside lax.scan on CPU (jdiff.models._conv)
            x.astype(dt),
            self.kernel[...].astype(dt),
            (self.stride, self.stride),
            self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(dt)

    def load(self, w: Weights, prefix: str) -> None:
        kernel, bias = w.conv(prefix, self.cin, self.cout, self.k)
        put(self.kernel, kernel)
        put(self.bias, bias)


class GroupNorm(nnx.Module):
    """GroupNorm over the last (channel) axis of ``(B, ..., C)`` input, computed in float32
    with the two-pass variance (as torch), returned in the compute dtype."""

    def __init__(self, channels: int, groups: int, eps: float, init: Init):
        if channels % groups:
            raise ValueError(f"GroupNorm of {channels} channels cannot have {groups} groups")
        self.channels, self.groups, self.eps, self.dtype = channels, groups, eps, init.dtype
        self.scale = init.const((channels,), 1.0)
        self.bias = init.const((channels,), 0.0)

    def __call__(self, x):
        shape = x.shape
        g = x.astype(jnp.float32).reshape(shape[0], -1, self.groups, self.channels // self.groups)
        centred = g - g.mean(axis=(1, 3), keepdims=True)
        var = jnp.mean(centred * centred, axis=(1, 3), keepdims=True)
        y = (centred * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)

    def load(self, w: Weights, prefix: str) -> None:
        scale, bias = w.norm(prefix, self.channels)
        put(self.scale, scale)
        put(self.bias, bias)


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
        init: Init,
        *,
        groups: int,
        eps: float,
        act: str,
        scale_shift: bool,
        output_scale_factor: float,
        resample: str | None = None,
    ):
        self.act = ACTIVATIONS[act]
        self.scale_shift = scale_shift
        self.output_scale_factor = output_scale_factor
        self.resample = resample
        self.norm1 = GroupNorm(cin, groups, eps, init)
        self.conv1 = Conv(cin, cout, 3, init)
        self.time_emb_proj = Linear(temb, cout * (2 if scale_shift else 1), init)
        self.norm2 = GroupNorm(cout, groups, eps, init)
        self.conv2 = Conv(cout, cout, 3, init)
        self.conv_shortcut = Conv(cin, cout, 1, init) if cin != cout else None

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
        for name in ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"):
            if getattr(self, name) is not None:
                getattr(self, name).load(w, f"{prefix}.{name}")


# diffusers renames the attention projections of checkpoints saved before its
# Attention class (``_from_deprecated_attn_block``); such files still carry the old names.
_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


class Attention(nnx.Module):
    """Self-attention over the ``H * W`` positions of an NHWC map with a residual
    connection (diffusers' ``Attention`` as its U-Net blocks configure it).

    ``heads = channels // head_dim`` heads of ``head_dim`` channels; ``groups`` None means
    no group norm before the projections (the middle block's attention under
    ``scale_shift`` unless ``attn_norm_num_groups`` is set)."""

    def __init__(self, channels: int, head_dim: int, init: Init, *, groups: int | None, eps: float, rescale: float):
        self.heads = max(channels // head_dim, 1)
        self.head_dim = head_dim
        inner = self.heads * head_dim
        self.rescale = rescale
        self.group_norm = GroupNorm(channels, groups, eps, init) if groups else None
        self.to_q = Linear(channels, inner, init)
        self.to_k = Linear(channels, inner, init)
        self.to_v = Linear(channels, inner, init)
        self.to_out = Linear(inner, channels, init)

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
            getattr(self, name[:6]).load(w, f"{prefix}.{_LEGACY[name] if legacy else name}")


class Downsample(nnx.Module):
    """A stride-2 3x3 convolution (diffusers' ``Downsample2D`` with ``use_conv``): ``padding``
    zeros on each side, or with ``padding`` 0 one zero row/column at the bottom/right."""

    def __init__(self, channels: int, padding: int, init: Init):
        pad = ((0, 1), (0, 1)) if padding == 0 else ((padding, padding),) * 2
        self.conv = Conv(channels, channels, 3, init, stride=2, padding=pad)

    def __call__(self, x, emb=None):
        return self.conv(x)

    def load(self, w: Weights, prefix: str) -> None:
        self.conv.load(w, f"{prefix}.conv")


class Upsample(nnx.Module):
    """2x nearest-neighbour upsampling followed by a 3x3 convolution (``Upsample2D``)."""

    def __init__(self, channels: int, init: Init):
        self.conv = Conv(channels, channels, 3, init)

    def __call__(self, x, emb=None):
        return self.conv(_up(x))

    def load(self, w: Weights, prefix: str) -> None:
        self.conv.load(w, f"{prefix}.conv")


def _load_layers(block, w: Weights, prefix: str) -> None:
    for i, resnet in enumerate(block.resnets):
        resnet.load(w, f"{prefix}.resnets.{i}")
        if block.attentions is not None:
            block.attentions[i].load(w, f"{prefix}.attentions.{i}")


class DownBlock(nnx.Module):
    """``DownBlock2D`` / ``AttnDownBlock2D``: ``layers`` residual blocks (each followed by
    attention when ``head_dim`` is set), then an optional downsampler (``"conv"`` or
    ``"resnet"``). Returns the output and the activations it hands to the skip connections
    (each layer's output, and the downsampler's). ``res`` / ``attn``: the keywords of
    :class:`ResnetBlock` / :class:`Attention`."""

    def __init__(self, cin, cout, temb, init: Init, *, layers, head_dim, downsample, padding, res, attn):
        ins = [cin] + [cout] * (layers - 1)
        self.resnets = nnx.List([ResnetBlock(c, cout, temb, init, **res) for c in ins])
        self.attentions = nnx.List([Attention(cout, head_dim, init, **attn) for _ in ins]) if head_dim else None
        if downsample == "conv":
            self.downsampler = Downsample(cout, padding, init)
        elif downsample == "resnet":
            self.downsampler = ResnetBlock(cout, cout, temb, init, **res, resample="down")
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
        _load_layers(self, w, prefix)
        if self.downsampler is not None:
            self.downsampler.load(w, f"{prefix}.downsamplers.0")


class UpBlock(nnx.Module):
    """``UpBlock2D`` / ``AttnUpBlock2D``: ``len(skip_channels)`` residual blocks, each on
    the channel concatenation of the running activation and the last unconsumed skip
    activation (each followed by attention when ``head_dim`` is set), then an optional
    upsampler (``"conv"`` or ``"resnet"``)."""

    def __init__(self, cin, cout, skip_channels, temb, init: Init, *, head_dim, upsample, res, attn):
        ins = [cin] + [cout] * (len(skip_channels) - 1)
        self.resnets = nnx.List(
            [ResnetBlock(i + s, cout, temb, init, **res) for i, s in zip(ins, skip_channels, strict=True)]
        )
        self.attentions = nnx.List([Attention(cout, head_dim, init, **attn) for _ in ins]) if head_dim else None
        if upsample == "conv":
            self.upsampler = Upsample(cout, init)
        elif upsample == "resnet":
            self.upsampler = ResnetBlock(cout, cout, temb, init, **res, resample="up")
        else:
            self.upsampler = None

    def __call__(self, x, skips, emb):
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), emb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        return x if self.upsampler is None else self.upsampler(x, emb)

    def load(self, w: Weights, prefix: str) -> None:
        _load_layers(self, w, prefix)
        if self.upsampler is not None:
            self.upsampler.load(w, f"{prefix}.upsamplers.0")


class MidBlock(nnx.Module):
    """``UNetMidBlock2D`` with one layer: residual block, attention (unless
    ``add_attention`` is false), residual block."""

    def __init__(self, channels, temb, init: Init, *, head_dim, add_attention, res, attn):
        self.resnets = nnx.List([ResnetBlock(channels, channels, temb, init, **res) for _ in range(2)])
        self.attention = Attention(channels, head_dim, init, **attn) if add_attention else None

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
