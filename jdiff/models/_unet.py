"""A DDPM++ / ADM-style U-Net denoiser for images in NHWC layout.

The layout follows DDPM++ (Song et al., "Score-Based Generative Modeling through
Stochastic Differential Equations", ICLR 2021, App. H) as re-implemented for EDM
(Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models",
NeurIPS 2022, App. F.2), with the ADM options of Dhariwal & Nichol ("Diffusion Models
Beat GANs on Image Synthesis", NeurIPS 2021): adaptive group normalization
(``scale_shift``), heads of fixed width, and a class embedding with a null class for
classifier-free guidance (Ho & Salimans, 2021).

- A 3x3 input convolution to ``base_channels``;
- per level ``l`` (resolution ``image_size / 2^l``): ``num_res_blocks`` residual blocks
  to ``base_channels * channel_mult[l]`` (with self-attention where the resolution is
  in ``attn_resolutions``), then a downsampling block (except at the last level);
- a middle of two residual blocks, the first with self-attention;
- the mirror-image decoder with ``num_res_blocks + 1`` blocks per level, each
  consuming one encoder activation through a channel concatenation (the U-Net skip
  connections), self-attention after the last block of an attention level, and an
  upsampling block between levels;
- GroupNorm, SiLU and a zero-initialized 3x3 output convolution.

The embedding is ``e = SiLU(time_mlp(t) + class_table[y])``. A residual block computes
``h = conv3x3(SiLU(GN(x)))`` (resampling between the SiLU and the convolution), then
``h = SiLU(GN(h + W e))`` (DDPM++) or, with ``scale_shift``, ``h = SiLU(GN(h) (1 + s) + b)``
with ``(s, b) = W e`` (ADM's adaptive group norm), then dropout and a second
conv3x3; the result is added to the (1x1-projected, resampled) input and scaled by
``1/sqrt(2)`` (``skip_rescale``). With ``resblock_updown`` (BigGAN-style, Brock et al.
2019) resampling happens inside residual blocks (2x2 average pooling / nearest
upsampling: the ``[1, 1]`` filter of DDPM++); otherwise with a stride-2 3x3
convolution / nearest upsampling followed by a 3x3 convolution (DDPM). In the decoder
attention follows only the last block of a level, as in DDPM++ (ADM attends after
every block).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax.numpy as jnp
from flax import nnx

from jdiff.models._common import (
    SelfAttention,
    check_nhwc,
    dropout,
    xavier_uniform,
    zeros_init,
)
from jdiff.models._conv import conv_general_dilated
from jdiff.models._embed import ClassEmbedding, TimeEmbedding, conditioning

__all__ = ["UNetConfig", "UNet", "UNetContext", "ddpmpp_cifar10", "ddpmpp_cifar10_song", "unet_digits"]


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Configuration of :class:`UNet`.

    Attributes:
      image_size: height = width of the input (it must match at call time).
      in_channels: input channels; out_channels: output channels (default: in_channels).
      base_channels: channels of the input convolution and unit of ``channel_mult``.
      channel_mult: per-level channel multipliers; one level per entry, each but the
        last followed by a 2x downsampling.
      num_res_blocks: residual blocks per level in the encoder (decoder: one more).
      attn_resolutions: resolutions (e.g. ``(16,)``) with self-attention.
      num_heads: attention heads (used when ``head_channels`` is None).
      head_channels: if set, heads of this width (ADM uses 64).
      dropout: dropout rate in residual blocks (train mode only).
      emb_mult: the time/class embedding width is ``emb_mult * base_channels``.
      time_embedding: ``"sinusoidal"`` (DDPM++/ADM) or ``"fourier"`` (NCSN++).
      time_freq_dim: width of the time features (default ``base_channels``).
      time_scale: multiplies ``t`` before the time features (1000 for t in [0, 1]).
      fourier_std: std of the Fourier frequencies.
      num_classes: 0 for unconditional; else labels ``0..num_classes-1`` plus the null
        class ``num_classes``.
      class_dropout: an opt-in extra, 0 by default: in train mode, the probability with
        which the model itself replaces a label by the null class. Classifier-free-guidance
        label dropout belongs to the objective (``jdiff.train.LossConfig.label_dropout``);
        setting both drops a fraction ``1 - (1 - p)(1 - class_dropout)`` of labels.
      scale_shift: ADM's adaptive group norm ``GN(h)(1 + scale) + shift``; False adds the
        projected embedding before the norm (DDPM/DDPM++).
      resblock_updown: resample inside residual blocks (DDPM++/BigGAN) or with
        convolutions (DDPM).
      skip_rescale: scale residual sums by ``1/sqrt(2)`` (DDPM++).
      num_groups: GroupNorm groups (at most ``channels / 4``, as in DDPM++).
      norm_eps: GroupNorm epsilon.
      zero_init_residual: zero-initialize the last convolution of each residual block
        and each attention output projection (so blocks start as identities).
      dtype: compute dtype (None: float32); param_dtype: parameter dtype.
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    head_channels: int | None = None
    dropout: float = 0.1
    emb_mult: int = 4
    time_embedding: str = "sinusoidal"
    time_freq_dim: int | None = None
    time_scale: float = 1000.0
    fourier_std: float = 16.0
    num_classes: int = 0
    class_dropout: float = 0.0
    scale_shift: bool = False
    resblock_updown: bool = True
    skip_rescale: bool = True
    num_groups: int = 32
    norm_eps: float = 1e-6
    zero_init_residual: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def replace(self, **kw) -> UNetConfig:
        return dataclasses.replace(self, **kw)

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(self.image_size >> l for l in range(len(self.channel_mult)))

    def validate(self):
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        levels = len(self.channel_mult)
        if self.image_size < 1 or self.image_size % (1 << (levels - 1)):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2^{levels - 1} for {levels} levels")
        bad = [r for r in self.attn_resolutions if r not in self.resolutions]
        if bad:
            raise ValueError(f"attn_resolutions {bad} are not among the U-Net's resolutions {self.resolutions}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.class_dropout <= 1.0:
            raise ValueError("dropout must be in [0, 1) and class_dropout in [0, 1]")


def ddpmpp_cifar10(num_classes: int = 0, **overrides) -> UNetConfig:
    """DDPM++ for 32x32x3 CIFAR-10 as trained in EDM (Karras et al. 2022, App. F.2; the
    ``--arch=ddpmpp`` setting of their code): 128 base channels,
    ``channel_mult=(2, 2, 2)`` (levels 32, 16, 8 of 256 channels: EDM drops the 4x4
    level of Song et al. and widens the 32x32 one), 4 residual blocks per level,
    one-head attention at 16x16, dropout 0.13 (EDM's CIFAR-10 value), a 512-wide
    embedding of 128 sinusoidal time features, additive time injection, BigGAN-style
    resampling with the ``[1, 1]`` filter, ``1/sqrt(2)`` skip rescaling.

    55,732,739 parameters unconditional (measured with :func:`count_params`), the
    "about 56M" of EDM's DDPM++; +5,632 with 10 classes (a 11 x 512 table here, added
    after the time MLP as in ADM, where EDM adds a linear map of the one-hot label
    before it). Pass ``time_scale`` / ``time_input`` for your process (EDM's
    ``c_noise = log(sigma) / 4`` wants ``time_scale=1``)."""
    cfg = UNetConfig(
        image_size=32,
        in_channels=3,
        base_channels=128,
        channel_mult=(2, 2, 2),
        num_res_blocks=4,
        attn_resolutions=(16,),
        num_heads=1,
        dropout=0.13,
        emb_mult=4,
        time_embedding="sinusoidal",
        num_classes=num_classes,
        scale_shift=False,
        resblock_updown=True,
        skip_rescale=True,
    )
    return cfg.replace(**overrides)


def ddpmpp_cifar10_song(num_classes: int = 0, **overrides) -> UNetConfig:
    """The original DDPM++ cont. of Song et al. (ICLR 2021; ``cifar10_ddpmpp_continuous``):
    like :func:`ddpmpp_cifar10` but ``channel_mult=(1, 2, 2, 2)`` (levels 32, 16, 8, 4
    of 128, 256, 256, 256 channels) and dropout 0.1: 61,804,419 parameters."""
    return ddpmpp_cifar10(num_classes, channel_mult=(1, 2, 2, 2), dropout=0.1).replace(**overrides)


def unet_digits(image_size: int = 8, num_classes: int = 10, **overrides) -> UNetConfig:
    """A small U-Net for single-channel digits (the 8x8 scikit-learn digits, or 16x16 /
    32x32 MNIST-like images) that trains quickly on a CPU: 32 base channels, two
    residual blocks per level, attention (heads of 16 channels) at the lowest
    resolution, ADM scale-shift conditioning, dropout 0.1, a null class for guidance.

    ``image_size`` 8: levels 8, 4 (channels 32, 64), 1.12M parameters;
    16: levels 16, 8, 4 (32, 64, 64), 1.90M; 32: levels 32, 16, 8, 4 (32, 64, 64, 64)
    with one block per level, 1.92M (counts with ``num_classes=10``).
    """
    if image_size == 8:
        kw = dict(channel_mult=(1, 2), attn_resolutions=(4,), num_res_blocks=2)
    elif image_size == 16:
        kw = dict(channel_mult=(1, 2, 2), attn_resolutions=(4,), num_res_blocks=2)
    elif image_size == 32:
        kw = dict(channel_mult=(1, 2, 2, 2), attn_resolutions=(4,), num_res_blocks=1)
    else:
        raise ValueError(f"unet_digits supports image_size 8, 16 or 32, got {image_size}")
    cfg = UNetConfig(
        image_size=image_size,
        in_channels=1,
        base_channels=32,
        head_channels=16,
        dropout=0.1,
        num_classes=num_classes,
        scale_shift=True,
        **kw,
    )
    return cfg.replace(**overrides)


class UNetContext(NamedTuple):
    """What a U-Net's front passes to its deep and back parts (see :meth:`UNet.front`)."""

    emb: Any
    skips: tuple
    keys: Any
    dtype: Any


def _groups(channels: int, num_groups: int) -> int:
    g = max(1, min(num_groups, channels // 4))
    while channels % g:
        g -= 1
    return g


def _down(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _up(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class _Norm(nnx.Module):
    """GroupNorm computed in float32, returned in the compute dtype."""

    def __init__(self, channels, cfg: UNetConfig, rngs):
        self.gn = nnx.GroupNorm(
            channels,
            num_groups=_groups(channels, cfg.num_groups),
            epsilon=cfg.norm_eps,
            dtype=jnp.float32,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        self.dtype = cfg.dtype or jnp.float32

    def __call__(self, x):
        return self.gn(x.astype(jnp.float32)).astype(self.dtype)


def _conv(cin, cout, k, cfg, rngs, *, zero=False, stride=1):
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(k, k),
        strides=(stride, stride),
        padding=((k // 2, k // 2),) * 2,
        kernel_init=zeros_init if zero else xavier_uniform,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        conv_general_dilated=conv_general_dilated,  # fast gradients inside lax.scan on CPU (_conv.py)
        rngs=rngs,
    )


class _AttnBlock(nnx.Module):
    """``x + SelfAttention(GN(x))`` over the ``H * W`` positions (scaled by 1/sqrt 2)."""

    def __init__(self, channels, cfg: UNetConfig, rngs):
        if cfg.head_channels and channels % cfg.head_channels:
            raise ValueError(
                f"attention at {channels} channels cannot use heads of head_channels={cfg.head_channels} "
                "channels: choose a head width that divides every attention level's channels"
            )
        heads = channels // cfg.head_channels if cfg.head_channels else cfg.num_heads
        if heads < 1 or channels % heads:
            raise ValueError(
                f"cannot split {channels} channels into attention heads (num_heads={cfg.num_heads}, "
                f"head_channels={cfg.head_channels})"
            )
        self.norm = _Norm(channels, cfg, rngs)
        self.attn = SelfAttention(
            channels, heads, zero_out=cfg.zero_init_residual, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.scale = 1.0 / math.sqrt(2.0) if cfg.skip_rescale else 1.0

    def __call__(self, x):
        b, h, w, c = x.shape
        a = self.attn(self.norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)
        return (x + a) * self.scale


class _ResBlock(nnx.Module):
    def __init__(self, cin, cout, emb_dim, cfg: UNetConfig, rngs, *, resample=None, attention=False, takes_skip=False):
        self.takes_skip = takes_skip
        self.resample = resample
        self.scale_shift = cfg.scale_shift
        self.rate = cfg.dropout
        self.norm0 = _Norm(cin, cfg, rngs)
        self.conv0 = _conv(cin, cout, 3, cfg, rngs)
        self.emb_proj = nnx.Linear(
            emb_dim,
            cout * (2 if cfg.scale_shift else 1),
            kernel_init=xavier_uniform,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        self.norm1 = _Norm(cout, cfg, rngs)
        self.conv1 = _conv(cout, cout, 3, cfg, rngs, zero=cfg.zero_init_residual)
        self.skip = _conv(cin, cout, 1, cfg, rngs) if (cin != cout or resample) else None
        self.out_scale = 1.0 / math.sqrt(2.0) if cfg.skip_rescale else 1.0
        self.attn = _AttnBlock(cout, cfg, rngs) if attention else None

    def _resample(self, x):
        if self.resample == "down":
            return _down(x)
        if self.resample == "up":
            return _up(x)
        return x

    def __call__(self, x, emb, key):
        h = self._resample(nnx.silu(self.norm0(x)))
        x = self._resample(x)
        h = self.conv0(h)
        p = self.emb_proj(emb)[:, None, None, :].astype(h.dtype)
        if self.scale_shift:
            scale, shift = jnp.split(p, 2, axis=-1)
            h = nnx.silu(self.norm1(h) * (1 + scale) + shift)
        else:
            h = nnx.silu(self.norm1(h + p))
        h = self.conv1(dropout(h, self.rate, key))
        if self.skip is not None:
            x = self.skip(x)
        h = (h + x) * self.out_scale
        if self.attn is not None:
            h = self.attn(h)
        return h


class _ConvResample(nnx.Module):
    """DDPM resampling: a stride-2 3x3 convolution down, nearest upsampling then a 3x3
    convolution up."""

    def __init__(self, channels, cfg, rngs, *, kind):
        self.kind = kind
        self.takes_skip = False
        self.conv = _conv(channels, channels, 3, cfg, rngs, stride=2 if kind == "down" else 1)

    def __call__(self, x, emb, key):
        del emb, key
        return self.conv(_up(x) if self.kind == "up" else x)


class UNet(nnx.Module):
    """DDPM++ / ADM-style U-Net (see the module docstring and :class:`UNetConfig`).

    Call: ``model(x, t, cond=None, *, rngs=None)``.

    Args:
      x: ``(B, H, W, C)`` images (NHWC) with ``H = W = image_size``, ``C = in_channels``.
      t: ``(B,)`` float times (a scalar is broadcast), scaled by ``time_scale``.
      cond: None (unconditional; for a class-conditional model the null class) or
        int labels ``(B,)`` in ``[0, num_classes]``, ``num_classes`` being the null class.
      rngs: None for eval mode (deterministic); a JAX PRNG key or an ``nnx.Rngs``
        (its ``dropout`` stream, else ``default``) for train mode (dropout, and label
        dropout when ``class_dropout > 0``). Labels outside ``[0, num_classes]`` raise
        ``ValueError``, or fail the compiled program under ``jit``.

    Returns:
      ``(B, H, W, out_channels)`` in ``x``'s dtype. A fresh model returns exactly zeros
      (zero-initialized output convolution).
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        c.validate()
        base = c.base_channels
        emb_dim = c.emb_mult * base
        out_ch = c.out_channels or c.in_channels
        self.time_embed = TimeEmbedding(
            emb_dim,
            kind=c.time_embedding,
            freq_dim=c.time_freq_dim or base,
            scale=c.time_scale,
            fourier_std=c.fourier_std,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            rngs=rngs,
        )
        self.class_embed = (
            ClassEmbedding(c.num_classes, emb_dim, param_dtype=c.param_dtype, rngs=rngs) if c.num_classes > 0 else None
        )
        self.conv_in = _conv(c.in_channels, base, 3, c, rngs)

        def block(cin, cout, **kw):
            return _ResBlock(cin, cout, emb_dim, c, rngs, **kw)

        def resample(ch, kind):
            if c.resblock_updown:
                return block(ch, ch, resample=kind)
            return _ConvResample(ch, c, rngs, kind=kind)

        enc, skips = [], [base]
        ch = base
        levels = len(c.channel_mult)
        for level, mult in enumerate(c.channel_mult):
            res = c.image_size >> level
            for _ in range(c.num_res_blocks):
                enc.append(block(ch, base * mult, attention=res in c.attn_resolutions))
                ch = base * mult
                skips.append(ch)
            if level < levels - 1:
                enc.append(resample(ch, "down"))
                skips.append(ch)
        self.enc = nnx.List(enc)
        self.mid = nnx.List([block(ch, ch, attention=True), block(ch, ch)])
        dec = []
        for level in reversed(range(levels)):
            res = c.image_size >> level
            mult = c.channel_mult[level]
            for i in range(c.num_res_blocks + 1):
                attn = i == c.num_res_blocks and res in c.attn_resolutions
                dec.append(block(ch + skips.pop(), base * mult, attention=attn, takes_skip=True))
                ch = base * mult
            if level > 0:
                dec.append(resample(ch, "up"))
        assert not skips
        self.dec = nnx.List(dec)
        self.norm_out = _Norm(ch, c, rngs)
        self.conv_out = _conv(ch, out_ch, 3, c, rngs, zero=True)

    def __call__(self, x, t, cond=None, *, rngs=None):
        h, ctx = self.front(x, t, cond, cut=0, rngs=rngs)
        return self.back(self.deep(h, ctx, cut=0), ctx, cut=0)

    # The model's internals as values (see jdiff.models.internals): the call above is
    # ``back(deep(front(x)))`` for every cut, so the parts compose to the model exactly.

    @property
    def num_cuts(self) -> int:
        """Cuts ``0..num_cuts - 1``: cut ``k`` puts the input convolution and the first ``k``
        encoder blocks in the front."""
        return len(self.enc) + 1

    def _check_cut(self, cut):
        if not isinstance(cut, int) or not 0 <= cut < self.num_cuts:
            raise ValueError(f"a U-Net cut is an int in [0, {self.num_cuts}), got {cut!r}")

    def front(self, x, t, cond=None, *, cut: int, rngs=None):
        """The shallow encoder: ``(h, ctx)`` with ``h`` the output of encoder block
        ``cut - 1`` (the input convolution's at cut 0) and ``ctx`` what the other parts
        need (the embedding, the front's skip activations, the dropout keys, x's dtype)."""
        self._check_cut(cut)
        c = self.config
        x = check_nhwc(x, c.image_size, c.in_channels, "UNet")
        emb, keys = conditioning(
            self.time_embed, self.class_embed, t, cond, x.shape[0], c.num_classes, c.class_dropout, rngs
        )
        emb = nnx.silu(emb)
        h = self.conv_in(x.astype(c.dtype or jnp.float32))
        skips = [h]
        for blk in self.enc[:cut]:
            h = blk(h, emb, keys.next())
            skips.append(h)
        return h, UNetContext(emb, tuple(skips), keys, x.dtype)

    def _deep_dec(self, cut):
        """Number of decoder blocks in the deep part: those run while a skip of the deep
        encoder part is still on the stack (resampling blocks before the first front skip
        included)."""
        stack = len(self.enc) + 1
        n = 0
        for i, blk in enumerate(self.dec):
            if blk.takes_skip:
                if stack == cut + 1:
                    break
                stack -= 1
            n = i + 1
        return n

    def deep(self, h, ctx: UNetContext, *, cut: int):
        """The deep part: encoder blocks ``cut..``, the middle, and the decoder blocks that
        consume the deep encoder's skips. Returns the feature the shallow decoder reads
        (DeepCache's cached feature, Ma et al. 2024)."""
        self._check_cut(cut)
        emb, keys = ctx.emb, ctx.keys
        skips = [h]
        for blk in self.enc[cut:]:
            h = blk(h, emb, keys.next())
            skips.append(h)
        skips.pop(0)
        for blk in self.mid:
            h = blk(h, emb, keys.next())
        for blk in self.dec[: self._deep_dec(cut)]:
            if blk.takes_skip:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = blk(h, emb, keys.next())
        return h

    def back(self, f, ctx: UNetContext, *, cut: int):
        """The shallow decoder: the decoder blocks that consume the front's skips, then the
        output norm and convolution; returns the model's output in x's dtype."""
        self._check_cut(cut)
        emb, keys = ctx.emb, ctx.keys
        skips = list(ctx.skips)
        h = f
        for blk in self.dec[self._deep_dec(cut) :]:
            if blk.takes_skip:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = blk(h, emb, keys.next())
        h = nnx.silu(self.norm_out(h))
        return self.conv_out(h).astype(ctx.dtype)
