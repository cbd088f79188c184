"""diffusers' ``AutoencoderKL`` (the VAE of latent diffusion) as a jdiff NNX module, NHWC.

The KL-regularized autoencoder of Rombach et al., "High-Resolution Image Synthesis with
Latent Diffusion Models" (CVPR 2022, section 3 and appendix G), whose convolutional
encoder and decoder come from Esser et al.'s VQGAN ("Taming Transformers", CVPR 2021):
Stable Diffusion's and DiT's ``sd-vae-ft-ema`` / ``sd-vae-ft-mse`` are of this class.

Encoder::

    conv_in 3x3 -> for each level: layers_per_block ResNet blocks, then (all but the
    last level) a stride-2 3x3 convolution after padding one zero row and column at
    the bottom and right (diffusers' asymmetric padding) -> mid block (ResNet,
    attention, ResNet) -> GroupNorm, SiLU, conv_out 3x3 to 2 * latent_channels ->
    quant_conv 1x1  =  (mean, logvar), logvar clipped to [-30, 20]

Decoder::

    post_quant_conv 1x1 -> conv_in 3x3 -> mid block -> for each level, widest first:
    layers_per_block + 1 ResNet blocks, then (all but the last) nearest-neighbour 2x
    upsampling and a 3x3 convolution -> GroupNorm, SiLU, conv_out 3x3

A ResNet block (no time embedding) is ``skip(x) + conv2(SiLU(GN2(conv1(SiLU(GN1(x))))))``
with a 1x1 ``skip`` where the width changes; the mid block's attention is one head over
all channels of the ``H * W`` positions, ``x + out(softmax(q k^T / sqrt(C)) v)`` with
``q, k, v`` linear maps of ``GN(x)``. Every GroupNorm has epsilon 1e-6.

Latent diffusion runs in ``z = (mean - shift_factor) * scaling_factor`` (scaling factor
0.18215 for Stable Diffusion's VAE: the latents' component-wise standard deviation,
paper section 4.3.2 and appendix D.1); :meth:`AutoencoderKL.to_latent` and
:meth:`AutoencoderKL.from_latent` apply it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdiff.interop._convert import UnsupportedModelError, Weights
from jdiff.models._common import attention
from jdiff.models._conv import conv_general_dilated

__all__ = ["AutoencoderKL", "VAEConfig", "from_diffusers"]

_EPS = 1e-6  # every GroupNorm of diffusers' Encoder and Decoder
_DOWN = "DownEncoderBlock2D"
_UP = "UpDecoderBlock2D"
_ACTS = ("silu", "swish")  # one function under two names in diffusers' get_activation


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The ``config.json`` keys of an ``AutoencoderKL`` that shape the computation.

    Attributes (diffusers' defaults where a key is absent):
      in_channels, out_channels: image channels (3).
      block_out_channels: width of each level (``(64,)``); one level per entry.
      layers_per_block: ResNet blocks per encoder level (1); the decoder has one more.
      latent_channels: channels of the latent (4).
      norm_num_groups: GroupNorm groups (32); must divide every width.
      sample_size: the training image size (32); informative only (diffusers tiles by it).
      scaling_factor: the latent scale (0.18215); shift_factor: subtracted before
        scaling (None: 0).
      use_quant_conv, use_post_quant_conv: the 1x1 convolutions around the latent (True).
      mid_block_add_attention: attention in the mid blocks (True).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Read a parsed ``config.json``; raise :class:`UnsupportedModelError` (one line,
        naming the key, the value found and what is supported) for anything else.

        ``force_upcast`` (a pipeline's half-precision policy) and keys starting with ``_``
        other than ``_class_name`` are ignored, as diffusers' model ignores them.
        """
        name = config.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise UnsupportedModelError(
                f"config.json: _class_name {name!r} is not supported here (supported: AutoencoderKL)"
            )
        levels = tuple(int(c) for c in config.get("block_out_channels", cls.block_out_channels))
        for key, want, default in (
            ("down_block_types", _DOWN, (_DOWN,)),
            ("up_block_types", _UP, (_UP,)),
        ):
            found = list(config.get(key, default))
            bad = [b for b in found if b != want]
            if bad:
                raise UnsupportedModelError(
                    f"config.json: {key} contains {bad[0]!r}, not supported (supported: {want!r} only)"
                )
            if len(found) != len(levels):
                raise UnsupportedModelError(
                    f"config.json: {key} has {len(found)} entries but block_out_channels has {len(levels)}"
                )
        act = config.get("act_fn", "silu")
        if act not in _ACTS:
            raise UnsupportedModelError(f"config.json: act_fn {act!r} is not supported (supported: 'silu', 'swish')")
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise UnsupportedModelError(
                    f"config.json: {key} is set, not supported (supported: null; per-channel latent "
                    "statistics belong to the pipeline, not the VAE)"
                )
        shift = config.get("shift_factor")
        groups = int(config.get("norm_num_groups", cls.norm_num_groups))
        bad = [c for c in levels if c % groups]
        if bad:
            raise UnsupportedModelError(
                f"config.json: norm_num_groups {groups} does not divide block_out_channels entry {bad[0]}"
            )
        size = config.get("sample_size", cls.sample_size)
        return cls(
            in_channels=int(config.get("in_channels", cls.in_channels)),
            out_channels=int(config.get("out_channels", cls.out_channels)),
            block_out_channels=levels,
            layers_per_block=int(config.get("layers_per_block", cls.layers_per_block)),
            latent_channels=int(config.get("latent_channels", cls.latent_channels)),
            norm_num_groups=groups,
            sample_size=tuple(size) if isinstance(size, Sequence) else int(size),
            scaling_factor=float(config.get("scaling_factor", cls.scaling_factor)),
            shift_factor=None if shift is None else float(shift),
            use_quant_conv=bool(config.get("use_quant_conv", True)),
            use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
        )


def _param(shape, fill: float = 0.0) -> nnx.Param:
    """A float32 parameter holding a NumPy constant until :meth:`AutoencoderKL.load` or
    :func:`_randomize` sets it (nothing traced or compiled per shape)."""
    return nnx.Param(np.full(shape, fill, np.float32))


def _randomize(module: nnx.Module, key) -> None:
    """Random weights for tests and benchmarks: every ``kernel`` ``N(0, 1 / fan_in)`` (fan_in
    = all but its last axis), drawn by NumPy from one seed taken from ``key``; biases stay 0
    and GroupNorm scales 1."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    for path, v in nnx.iter_graph(module):
        if isinstance(v, nnx.Param) and path[-1] == "kernel":
            shape = v.get_value().shape
            v.set_value(jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]))))


def _set(param: nnx.Param, value) -> None:
    param.set_value(jnp.asarray(value, jnp.float32))


class _Conv(nnx.Module):
    """``torch.nn.Conv2d`` in NHWC: a ``k x k`` HWIO kernel and bias, stride and explicit
    (lo, hi) padding on both spatial axes."""

    def __init__(self, c_in, c_out, k, *, dtype=None, stride=1, pad=None):
        self.c_in, self.c_out, self.k, self.stride = c_in, c_out, k, stride
        self.pad = (k // 2, k // 2) if pad is None else tuple(pad)
        self.dtype = dtype
        self.kernel = _param((k, k, c_in, c_out))
        self.bias = _param((c_out,))

    def load(self, w: Weights, prefix: str) -> None:
        kernel, bias = w.conv(prefix, self.c_in, self.c_out, self.k)
        _set(self.kernel, kernel)
        _set(self.bias, bias)

    def __call__(self, x):
        dt = self.dtype or x.dtype
        y = conv_general_dilated(  # fast gradients inside lax.scan on CPU (jdiff.models._conv)
            x.astype(dt),
            self.kernel[...].astype(dt),
            (self.stride, self.stride),
            (self.pad, self.pad),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(dt)


class _Norm(nnx.Module):
    """``torch.nn.GroupNorm`` (biased variance, epsilon 1e-6) computed in float32 and
    returned in the compute dtype."""

    def __init__(self, c, groups, dtype=None):
        self.c, self.groups, self.dtype = c, groups, dtype
        self.scale = _param((c,), fill=1.0)
        self.bias = _param((c,))

    def load(self, w: Weights, prefix: str) -> None:
        scale, bias = w.norm(prefix, self.c)
        _set(self.scale, scale)
        _set(self.bias, bias)

    def __call__(self, x):
        g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, self.c // self.groups)
        axes = (*range(1, x.ndim - 1), x.ndim)  # every spatial position and the group's channels
        mean = g.mean(axis=axes, keepdims=True)
        var = jnp.square(g - mean).mean(axis=axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + _EPS)).reshape(x.shape)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype or jnp.float32)


class _Linear(nnx.Module):
    """``torch.nn.Linear`` (c -> c) over the channel axis."""

    def __init__(self, c, dtype=None):
        self.c, self.dtype = c, dtype
        self.kernel = _param((c, c))
        self.bias = _param((c,))

    def load(self, w: Weights, prefix: str) -> None:
        kernel, bias = w.linear(prefix, self.c, self.c)
        _set(self.kernel, kernel)
        _set(self.bias, bias)

    def __call__(self, x):
        dt = self.dtype or x.dtype
        return x.astype(dt) @ self.kernel[...].astype(dt) + self.bias[...].astype(dt)


class _ResBlock(nnx.Module):
    """diffusers' ``ResnetBlock2D`` without a time embedding (dropout 0, output scale 1)."""

    def __init__(self, c_in, c_out, groups, dtype=None):
        self.norm1 = _Norm(c_in, groups, dtype)
        self.conv1 = _Conv(c_in, c_out, 3, dtype=dtype)
        self.norm2 = _Norm(c_out, groups, dtype)
        self.conv2 = _Conv(c_out, c_out, 3, dtype=dtype)
        self.conv_shortcut = _Conv(c_in, c_out, 1, dtype=dtype) if c_in != c_out else None

    def load(self, w: Weights, prefix: str) -> None:
        for name in ("norm1", "conv1", "norm2", "conv2", "conv_shortcut"):
            if getattr(self, name) is not None:
                getattr(self, name).load(w, f"{prefix}.{name}")

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class _Attention(nnx.Module):
    """The mid block's attention: one head over all channels, GroupNorm in, residual out."""

    # diffusers renames a pre-0.15 checkpoint's attention weights on load; so do we
    _OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def __init__(self, c, groups, dtype=None):
        self.group_norm = _Norm(c, groups, dtype)
        self.to_q = _Linear(c, dtype)
        self.to_k = _Linear(c, dtype)
        self.to_v = _Linear(c, dtype)
        self.to_out = _Linear(c, dtype)

    def load(self, w: Weights, prefix: str) -> None:
        self.group_norm.load(w, f"{prefix}.group_norm")
        old = f"{prefix}.to_q.weight" not in w and f"{prefix}.query.weight" in w
        for new, legacy in self._OLD_NAMES.items():
            layer = getattr(self, new.split(".")[0])
            layer.load(w, f"{prefix}.{legacy if old else new}")

    def __call__(self, x):
        b, h, wd, c = x.shape
        t = self.group_norm(x).reshape(b, h * wd, 1, c)
        out = attention(self.to_q(t), self.to_k(t), self.to_v(t))
        return x + self.to_out(out).reshape(b, h, wd, c)


class _Mid(nnx.Module):
    """``UNetMidBlock2D`` with one layer: ResNet, attention (optional), ResNet."""

    def __init__(self, c, groups, add_attention, dtype=None):
        self.resnets = nnx.List([_ResBlock(c, c, groups, dtype) for _ in range(2)])
        self.attention = _Attention(c, groups, dtype) if add_attention else None

    def load(self, w: Weights, prefix: str) -> None:
        for i, r in enumerate(self.resnets):
            r.load(w, f"{prefix}.resnets.{i}")
        if self.attention is not None:
            self.attention.load(w, f"{prefix}.attentions.0")

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class _Level(nnx.Module):
    """A ``DownEncoderBlock2D`` (``resample="down"``) or ``UpDecoderBlock2D`` (``"up"``):
    ResNet blocks, then an optional resampling convolution."""

    def __init__(self, c_in, c_out, n, groups, resample, dtype=None):
        self.resnets = nnx.List([_ResBlock(c_in if i == 0 else c_out, c_out, groups, dtype) for i in range(n)])
        self.resample = resample
        # down: one zero row/column padded at the bottom/right, stride 2; up: a same-size 3x3
        down = dict(stride=2, pad=(0, 1)) if resample == "down" else {}
        self.sampler = _Conv(c_out, c_out, 3, dtype=dtype, **down) if resample else None

    def load(self, w: Weights, prefix: str) -> None:
        for i, r in enumerate(self.resnets):
            r.load(w, f"{prefix}.resnets.{i}")
        if self.sampler is not None:
            self.sampler.load(w, f"{prefix}.{self.resample}samplers.0.conv")

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if self.resample == "up":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
        return x if self.sampler is None else self.sampler(x)


class _Encoder(nnx.Module):
    def __init__(self, c: VAEConfig, dtype=None):
        ch, g = c.block_out_channels, c.norm_num_groups
        self.conv_in = _Conv(c.in_channels, ch[0], 3, dtype=dtype)
        self.down_blocks = nnx.List(
            [
                _Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, "down" if i < len(ch) - 1 else None, dtype)
                for i in range(len(ch))
            ]
        )
        self.mid_block = _Mid(ch[-1], g, c.mid_block_add_attention, dtype)
        self.conv_norm_out = _Norm(ch[-1], g, dtype)
        self.conv_out = _Conv(ch[-1], 2 * c.latent_channels, 3, dtype=dtype)

    def load(self, w: Weights, prefix: str) -> None:
        self.conv_in.load(w, f"{prefix}.conv_in")
        for i, b in enumerate(self.down_blocks):
            b.load(w, f"{prefix}.down_blocks.{i}")
        self.mid_block.load(w, f"{prefix}.mid_block")
        self.conv_norm_out.load(w, f"{prefix}.conv_norm_out")
        self.conv_out.load(w, f"{prefix}.conv_out")

    def __call__(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class _Decoder(nnx.Module):
    def __init__(self, c: VAEConfig, dtype=None):
        ch, g = tuple(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = _Conv(c.latent_channels, ch[0], 3, dtype=dtype)
        self.mid_block = _Mid(ch[0], g, c.mid_block_add_attention, dtype)
        self.up_blocks = nnx.List(
            [
                _Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, "up" if i < len(ch) - 1 else None, dtype)
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = _Norm(ch[-1], g, dtype)
        self.conv_out = _Conv(ch[-1], c.out_channels, 3, dtype=dtype)

    def load(self, w: Weights, prefix: str) -> None:
        self.conv_in.load(w, f"{prefix}.conv_in")
        self.mid_block.load(w, f"{prefix}.mid_block")
        for i, b in enumerate(self.up_blocks):
            b.load(w, f"{prefix}.up_blocks.{i}")
        self.conv_norm_out.load(w, f"{prefix}.conv_norm_out")
        self.conv_out.load(w, f"{prefix}.conv_out")

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers' ``AutoencoderKL`` (Rombach et al., CVPR 2022) in NHWC; see the module
    docstring for the architecture.

    Arguments:
      config: a parsed diffusers ``config.json`` (a mapping) or a :class:`VAEConfig`.
      rngs: draws random weights (for tests and speed benchmarks: convolution and linear
        kernels ``N(0, 1 / fan_in)``, biases 0, GroupNorm scales 1); None leaves zero
        placeholders for :meth:`load` (what :func:`from_diffusers` does).
      dtype: compute dtype of the convolutions and linear maps (None: float32); the
        parameters, GroupNorms and attention softmax stay float32.
    """

    def __init__(self, config: Mapping[str, Any] | VAEConfig, *, rngs: nnx.Rngs | None, dtype=None):
        c = config if isinstance(config, VAEConfig) else VAEConfig.from_diffusers(config)
        self.config = c
        self.dtype = dtype
        lc = c.latent_channels
        self.encoder = _Encoder(c, dtype)
        self.decoder = _Decoder(c, dtype)
        self.quant_conv = _Conv(2 * lc, 2 * lc, 1, dtype=dtype) if c.use_quant_conv else None
        self.post_quant_conv = _Conv(lc, lc, 1, dtype=dtype) if c.use_post_quant_conv else None
        if rngs is not None:
            _randomize(self, rngs.params())

    @property
    def downsampling(self) -> int:
        """The ratio of image to latent height (and width): ``2 ** (levels - 1)``."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def load(self, w: Weights) -> None:
        """Set every parameter from a diffusers state dict (each key shape-checked)."""
        self.encoder.load(w, "encoder")
        self.decoder.load(w, "decoder")
        if self.quant_conv is not None:
            self.quant_conv.load(w, "quant_conv")
        if self.post_quant_conv is not None:
            self.post_quant_conv.load(w, "post_quant_conv")

    def _check(self, x, channels: int, what: str):
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL.{what} expects NHWC arrays (B, H, W, {channels}), got shape {x.shape}")
        return x.astype(self.dtype or jnp.float32)

    def encode(self, x):
        """The diagonal Gaussian posterior ``q(z | x)`` of images ``x``.

        Arguments:
          x: images ``(B, H, W, in_channels)``, in [-1, 1] as the VAE was trained.

        Returns:
          ``(mean, logvar)``, each ``(B, H / f, W / f, latent_channels)`` with ``f`` =
          :attr:`downsampling` (rounded down at each level where a size is odd, as in
          diffusers); ``logvar`` clipped to [-30, 20] as diffusers'
          ``DiagonalGaussianDistribution`` does.
        """
        h = self.encoder(self._check(x, self.config.in_channels, "encode"))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """Images ``(B, f H, f W, out_channels)`` (float32) from latents ``z`` ``(B, H, W,
        latent_channels)`` in the VAE's own (unscaled) units."""
        z = self._check(z, self.config.latent_channels, "decode")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def to_latent(self, images, key=None):
        """The diffusion model's latent of ``images``: ``(m - shift_factor) * scaling_factor``.

        Arguments:
          images: ``(B, H, W, in_channels)`` in [-1, 1].
          key: None to use the posterior mean; a PRNG key to draw
            ``m = mean + exp(logvar / 2) * N(0, I)`` (diffusers' ``latent_dist.sample()``).

        Returns:
          The scaled latent, float32.
        """
        mean, logvar = self.encode(images)
        m = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return (m - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def from_latent(self, z):
        """Images decoded from a diffusion model's latent: ``decode(z / scaling_factor +
        shift_factor)`` (the inverse of :meth:`to_latent` up to the autoencoder's error)."""
        z = jnp.asarray(z, jnp.float32)
        return self.decode(z / self.config.scaling_factor + (self.config.shift_factor or 0.0))


def from_diffusers(config: Mapping[str, Any], weights: Weights, *, dtype=None) -> AutoencoderKL:
    """An :class:`AutoencoderKL` with a diffusers checkpoint's weights.

    Arguments:
      config: the parsed ``config.json`` of the ``AutoencoderKL`` folder.
      weights: its state dict as :class:`~jdiff.interop.Weights` (every tensor consumed and
        shape-checked; a key left over is an error).
      dtype: compute dtype (None: float32).

    Returns:
      The module, ready to :meth:`~AutoencoderKL.encode` / :meth:`~AutoencoderKL.decode`.

    Raises:
      UnsupportedModelError: a class, block type or config value jdiff does not implement.
      WeightError: a missing, extra or mis-shaped weight (naming the key and both shapes).
    """
    c = VAEConfig.from_diffusers(config)
    vae = AutoencoderKL(c, rngs=None, dtype=dtype)  # zero placeholders: nothing drawn or compiled
    vae.load(weights)
    weights.finish()
    unset = [p for p, v in nnx.to_flat_state(nnx.state(vae)) if not isinstance(v.get_value(), jax.Array)]
    assert not unset, f"parameters not loaded: {unset}"  # every module's load() covers its own
    return vae
