"""Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with
Transformers", ICCV 2023).

``x (B, H, W, C)`` is cut into ``p x p`` patches, each linearly embedded to
``hidden_dim`` and added to a position embedding (fixed 2-D sin-cos as in the paper,
or learned). The conditioning vector ``c = time_mlp(t) + class_embedding(y)`` (with a
null class for classifier-free guidance) drives every block through adaLN-Zero:
``(shift, scale, gate)`` for attention and for the MLP are regressed from ``SiLU(c)`` by
a zero-initialized linear layer, so every block starts as the identity::

    x = x + gate_msa * Attn(LN(x) (1 + scale_msa) + shift_msa)
    x = x + gate_mlp * MLP(LN(x) (1 + scale_mlp) + shift_mlp)

A final adaLN layer and a zero-initialized linear layer map tokens back to
``p * p * out_channels`` values, which are rearranged into an image.
(The paper's learned-variance output channels are not included: jdiff models predict
one target of the input's shape.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
from flax import nnx

from jdiff.models._common import KeySeq, SelfAttention, check_nhwc, dropout, xavier_uniform, zeros_init
from jdiff.models._embed import ClassEmbedding, TimeEmbedding, conditioning

__all__ = [
    "DiTConfig",
    "DiT",
    "DiTContext",
    "dit_s2",
    "dit_b2",
    "dit_l2",
    "dit_xl2",
    "dit_tiny",
    "sincos_pos_embed_2d",
    "patchify",
    "unpatchify",
]


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Configuration of :class:`DiT`.

    Attributes:
      image_size: input height = width; in_channels / out_channels (default in_channels).
      patch_size: ``p``; ``image_size`` must be divisible by it.
      hidden_dim, depth, num_heads, mlp_ratio: transformer sizes.
      pos_embed: ``"sincos"`` (fixed 2-D sin-cos, the paper's choice) or ``"learned"``.
      time_embedding, time_freq_dim, time_scale, fourier_std: the time embedding (256
        sinusoidal frequencies in the paper; ``time_scale`` 1000 for t in [0, 1]).
      num_classes: 0 for unconditional; else labels ``0..num_classes-1`` plus the null
        class ``num_classes``.
      class_dropout: an opt-in extra, 0 by default: in train mode, the probability with
        which the model itself replaces a label by the null class. Classifier-free-guidance
        label dropout belongs to the objective (``jdiff.train.LossConfig.label_dropout``);
        setting both drops a fraction ``1 - (1 - p)(1 - class_dropout)`` of labels. (The paper's 0.1 is
        ``LossConfig(label_dropout=0.1)`` here.)
      dropout: dropout on attention and MLP outputs (train mode only; 0 in the paper).
      dtype: compute dtype (None: float32); param_dtype: parameter dtype.
    """

    image_size: int = 32
    in_channels: int = 4
    out_channels: int | None = None
    patch_size: int = 2
    hidden_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    pos_embed: str = "sincos"
    time_embedding: str = "sinusoidal"
    time_freq_dim: int = 256
    time_scale: float = 1000.0
    fourier_std: float = 16.0
    num_classes: int = 0
    class_dropout: float = 0.0
    dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def replace(self, **kw) -> DiTConfig:
        return dataclasses.replace(self, **kw)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def validate(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim={self.hidden_dim} is not divisible by num_heads={self.num_heads}")
        if self.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {self.pos_embed!r}")
        if self.pos_embed == "sincos" and self.hidden_dim % 4:
            raise ValueError(f"2-D sin-cos position embeddings need hidden_dim divisible by 4, got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.class_dropout <= 1.0:
            raise ValueError("dropout must be in [0, 1) and class_dropout in [0, 1]")


def _named(depth, hidden, heads):
    def make(
        image_size: int = 32, in_channels: int = 4, num_classes: int = 0, patch_size: int = 2, **overrides
    ) -> DiTConfig:
        return DiTConfig(
            image_size=image_size,
            in_channels=in_channels,
            patch_size=patch_size,
            hidden_dim=hidden,
            depth=depth,
            num_heads=heads,
            num_classes=num_classes,
        ).replace(**overrides)

    return make


dit_s2 = _named(12, 384, 6)
dit_s2.__doc__ = "DiT-S/2 (Peebles & Xie 2023, Table 1): depth 12, width 384, 6 heads, patch 2."
dit_b2 = _named(12, 768, 12)
dit_b2.__doc__ = "DiT-B/2: depth 12, width 768, 12 heads, patch 2."
dit_l2 = _named(24, 1024, 16)
dit_l2.__doc__ = "DiT-L/2: depth 24, width 1024, 16 heads, patch 2."
dit_xl2 = _named(28, 1152, 16)
dit_xl2.__doc__ = (
    "DiT-XL/2: depth 28, width 1152, 16 heads, patch 2 "
    "(the paper's 256x256 latent model uses image_size=32, in_channels=4)."
)


def dit_tiny(image_size: int = 8, in_channels: int = 1, num_classes: int = 0, **overrides) -> DiTConfig:
    """A tiny DiT for tests and toy data: depth 2, width 64, 4 heads, patch 2."""
    return DiTConfig(
        image_size=image_size,
        in_channels=in_channels,
        patch_size=2,
        hidden_dim=64,
        depth=2,
        num_heads=4,
        time_freq_dim=64,
        num_classes=num_classes,
    ).replace(**overrides)


def _sincos_1d(pos, dim):
    omega = 1.0 / 10000.0 ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None, :]
    return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid: int):
    """Fixed 2-D sin-cos position embeddings (Vaswani et al. 2017 per axis, as in MAE
    and DiT): half the channels encode the row, half the column. ``(grid * grid, dim)``,
    row-major order."""
    rows, cols = jnp.meshgrid(jnp.arange(grid, dtype=jnp.float32), jnp.arange(grid, dtype=jnp.float32), indexing="ij")
    return jnp.concatenate([_sincos_1d(rows, dim // 2), _sincos_1d(cols, dim // 2)], axis=1)


def patchify(x, p: int):
    """``(B, H, W, C) -> (B, (H/p)(W/p), p*p*C)``, patches in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, p: int, h: int, w: int):
    """Inverse of :func:`patchify`: ``(B, (H/p)(W/p), p*p*C) -> (B, H, W, C)``."""
    b, n, d = tokens.shape
    c = d // (p * p)
    x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class DiTContext(NamedTuple):
    """What a DiT's embedding passes to its blocks and head (see :meth:`DiT.embed`)."""

    cvec: Any
    keys: Any
    dtype: Any


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class _Mlp(nnx.Module):
    def __init__(self, dim, hidden, cfg, rngs):
        kw = dict(kernel_init=xavier_uniform, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.fc1 = nnx.Linear(dim, hidden, **kw)
        self.fc2 = nnx.Linear(hidden, dim, **kw)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x), approximate=True))


class _DiTBlock(nnx.Module):
    def __init__(self, cfg: DiTConfig, rngs):
        d = cfg.hidden_dim
        ln = dict(
            epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.norm1 = nnx.LayerNorm(d, **ln)
        self.attn = SelfAttention(
            d, cfg.num_heads, zero_out=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(d, **ln)
        self.mlp = _Mlp(d, int(d * cfg.mlp_ratio), cfg, rngs)
        self.ada = nnx.Linear(d, 6 * d, kernel_init=zeros_init, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.rate = cfg.dropout
        self.dtype = cfg.dtype or jnp.float32

    def __call__(self, x, c, keys: KeySeq):
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(self.ada(nnx.silu(c)), 6, axis=-1)
        h = _modulate(self.norm1(x).astype(self.dtype), sh1, sc1)
        x = x + g1[:, None, :] * dropout(self.attn(h), self.rate, keys.next())
        h = _modulate(self.norm2(x).astype(self.dtype), sh2, sc2)
        x = x + g2[:, None, :] * dropout(self.mlp(h), self.rate, keys.next())
        return x


class DiT(nnx.Module):
    """Diffusion Transformer with adaLN-Zero conditioning (see the module docstring).

    Call: ``model(x, t, cond=None, *, rngs=None)`` with ``x`` NHWC
    ``(B, image_size, image_size, in_channels)``, ``t`` ``(B,)`` floats, ``cond`` None or
    int labels ``(B,)`` (``num_classes`` = null class), ``rngs`` None (eval) or a PRNG
    key / ``nnx.Rngs`` (train mode: dropout, and label dropout with ``class_dropout``). Returns
    ``(B, H, W, out_channels)`` in ``x``'s dtype; a fresh model returns exactly zeros.
    """

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        c.validate()
        d, p = c.hidden_dim, c.patch_size
        out_ch = c.out_channels or c.in_channels
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.patch_embed = nnx.Linear(p * p * c.in_channels, d, kernel_init=xavier_uniform, **kw)
        if c.pos_embed == "learned":
            self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (c.grid_size**2, d), c.param_dtype))
        else:
            self.pos = None
        self.time_embed = TimeEmbedding(
            d,
            kind=c.time_embedding,
            freq_dim=c.time_freq_dim,
            scale=c.time_scale,
            fourier_std=c.fourier_std,
            init=nnx.initializers.normal(0.02),
            **kw,
        )
        self.class_embed = (
            ClassEmbedding(c.num_classes, d, init_std=0.02, param_dtype=c.param_dtype, rngs=rngs)
            if c.num_classes > 0
            else None
        )
        self.blocks = nnx.List([_DiTBlock(c, rngs) for _ in range(c.depth)])
        self.norm_out = nnx.LayerNorm(
            d, epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32, param_dtype=c.param_dtype, rngs=rngs
        )
        self.ada_out = nnx.Linear(d, 2 * d, kernel_init=zeros_init, **kw)
        self.proj_out = nnx.Linear(d, p * p * out_ch, kernel_init=zeros_init, **kw)

    def __call__(self, x, t, cond=None, *, rngs=None):
        h, ctx = self.front(x, t, cond, cut=0, rngs=rngs)
        return self.back(self.deep(h, ctx, cut=0), ctx, cut=0)

    # The model's internals as values (see jdiff.models.internals): the call above is
    # ``back(deep(front(x)))`` for every cut, and also the token embedding, each block
    # in turn, then the output layer (``embed``, ``block``, ``head``).

    @property
    def num_cuts(self) -> int:
        """Cuts ``0..num_cuts - 1``: cut ``k`` puts the first ``k`` and the last ``k``
        blocks in the front and the back; the deep part is the ``depth - 2k`` in between."""
        return self.config.depth // 2 + 1

    def _check_cut(self, cut):
        if not isinstance(cut, int) or not 0 <= cut < self.num_cuts:
            raise ValueError(f"a DiT cut is an int in [0, {self.num_cuts}), got {cut!r}")

    def embed(self, x, t, cond=None, *, rngs=None):
        """Patch and position embedding and the conditioning vector: ``(tokens, ctx)``."""
        c = self.config
        x = check_nhwc(x, c.image_size, c.in_channels, "DiT")
        cvec, keys = conditioning(
            self.time_embed, self.class_embed, t, cond, x.shape[0], c.num_classes, c.class_dropout, rngs
        )
        cdt = c.dtype or jnp.float32
        h = self.patch_embed(patchify(x.astype(cdt), c.patch_size))
        pos = self.pos[...] if self.pos is not None else sincos_pos_embed_2d(c.hidden_dim, c.grid_size)
        h = h + pos.astype(h.dtype)[None]
        return h, DiTContext(cvec, keys, x.dtype)

    def block(self, i: int, h, ctx: DiTContext):
        """Transformer block ``i`` (adaLN-Zero) on the tokens ``h``."""
        return self.blocks[i](h, ctx.cvec, ctx.keys)

    def head(self, h, ctx: DiTContext):
        """The final adaLN layer and linear map from tokens to the output image."""
        c = self.config
        shift, scale = jnp.split(self.ada_out(nnx.silu(ctx.cvec)), 2, axis=-1)
        h = _modulate(self.norm_out(h).astype(c.dtype or jnp.float32), shift, scale)
        out = unpatchify(self.proj_out(h), c.patch_size, c.image_size, c.image_size)
        return out.astype(ctx.dtype)

    def front(self, x, t, cond=None, *, cut: int, rngs=None):
        """Embedding and blocks ``0..cut-1``: ``(tokens, ctx)``."""
        self._check_cut(cut)
        h, ctx = self.embed(x, t, cond, rngs=rngs)
        for i in range(cut):
            h = self.block(i, h, ctx)
        return h, ctx

    def deep(self, h, ctx: DiTContext, *, cut: int):
        """Blocks ``cut..depth-cut-1`` (the cached / forecast part of FORA, Delta-DiT and
        TaylorSeer-style accelerations)."""
        self._check_cut(cut)
        for i in range(cut, self.config.depth - cut):
            h = self.block(i, h, ctx)
        return h

    def back(self, f, ctx: DiTContext, *, cut: int):
        """Blocks ``depth-cut..depth-1`` and the output layer."""
        self._check_cut(cut)
        for i in range(self.config.depth - cut, self.config.depth):
            f = self.block(i, f, ctx)
        return self.head(f, ctx)
