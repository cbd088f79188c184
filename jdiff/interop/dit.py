"""diffusers' ``DiTTransformer2DModel`` as a jdiff NNX module (NHWC), built from its
``config.json`` and loaded from its state dict without torch.

The architecture is DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers",
ICCV 2023) as diffusers implements it (``models/transformers/dit_transformer_2d.py``), the
transformer of ``facebook/DiT-XL-2-256``:

- patch embedding: a ``p x p`` stride-``p`` convolution, plus a fixed 2-D sin-cos position
  table (diffusers' ``get_2d_sincos_pos_embed``: the first half of the channels encodes the
  column, the second half the row; positions ``i / (n / base)`` with ``base =
  sample_size / p`` so an input of another size is interpolated onto the trained range);
- per block, its own conditioning ``c = MLP(timestep features) + table[label]``
  (``CombinedTimestepLabelEmbeddings``: 256 sinusoidal features, cos first, frequencies
  ``exp(-ln(10^4) k / 127)``; the table has ``num_embeds_ada_norm + 1`` rows, the last one
  the null class of classifier-free guidance);
- adaLN-Zero blocks: ``(shift, scale, gate)`` for attention and for the MLP regressed from
  ``SiLU(c)``; ``x += gate_msa * Attn(LN(x)(1 + scale_msa) + shift_msa)``, ``x += gate_mlp *
  MLP(LN'(x)(1 + scale_mlp) + shift_mlp)`` (``LN`` has eps 1e-6 and no affine; ``LN'`` uses
  ``norm_eps`` and ``norm_elementwise_affine``);
- final layer: ``(shift, scale)`` from ``SiLU(c_0)`` (block 0's conditioning, as diffusers
  does), ``LN``, a linear map to ``p * p * out_channels`` per token, rearranged to an image.

With learned sigma (``out_channels == 2 * in_channels``, the DiT checkpoints), the first
``in_channels`` output channels are the noise prediction and the rest the variance values;
:attr:`DiTTransformer2D.prediction_channels` and :meth:`DiTTransformer2D.split_output` say which.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdiff.interop._convert import UnsupportedModelError, Weights
from jdiff.models import attention, check_labels, patchify, unpatchify
from jdiff.models._common import check_time

__all__ = ["DiTSpec", "DiTTransformer2D", "from_diffusers", "dit_pos_embed", "dit_timestep_features"]

# DiTTransformer2DModel's defaults (diffusers), used where a config key is absent
_DEFAULTS = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=None,
    num_layers=28,
    dropout=0.0,
    norm_num_groups=32,
    attention_bias=True,
    sample_size=32,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    upcast_attention=False,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
    norm_eps=1e-5,
)
# Transformer2DModel is the legacy name (facebook/DiT-XL-2-256 has it); diffusers loads it as
# DiTTransformer2DModel when norm_type is "ada_norm_zero"
_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_ACTIVATIONS = {"gelu-approximate": True, "gelu": False}  # name -> tanh approximation
_TIME_FEATURES = 256  # CombinedTimestepLabelEmbeddings' sinusoidal features


def _unsupported(key: str, value, supported: str):
    return UnsupportedModelError(f"DiT config: {key}={value!r} is not supported (supported: {supported})")


@dataclasses.dataclass(frozen=True)
class DiTSpec:
    """The architecture a DiT ``config.json`` describes (diffusers' defaults filled in).

    Attributes:
      heads, head_dim: attention heads and channels per head (width = heads * head_dim).
      in_channels, out_channels: latent channels in and out (out = 2 * in: learned sigma).
      num_layers: transformer blocks.
      sample_size, patch_size: the trained latent size and the patch size.
      num_classes: class labels ``0..num_classes-1``; ``num_classes`` is the null class.
      approximate_gelu: the feed-forward GELU uses the tanh approximation.
      attention_bias: the q/k/v projections have biases.
      norm_affine, norm_eps: the feed-forward LayerNorm's elementwise affine and eps.
    """

    heads: int
    head_dim: int
    in_channels: int
    out_channels: int
    num_layers: int
    sample_size: int
    patch_size: int
    num_classes: int
    approximate_gelu: bool = True
    attention_bias: bool = True
    norm_affine: bool = False
    norm_eps: float = 1e-5

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def prediction_channels(self) -> int:
        """Channels of the model's prediction: ``in_channels`` with learned sigma (the
        rule of diffusers' DiT pipeline: ``out_channels // 2 == in_channels``), else all."""
        return self.in_channels if self.out_channels // 2 == self.in_channels else self.out_channels

    @classmethod
    def from_config(cls, config: dict) -> DiTSpec:
        """Read a ``DiTTransformer2DModel`` (or legacy ``Transformer2DModel`` with
        ``norm_type="ada_norm_zero"``) config; :class:`UnsupportedModelError` names any key
        whose value this module does not implement. ``dropout`` (inference only),
        ``norm_num_groups`` (unused by diffusers' DiT) and ``upcast_attention`` (softmax is
        always float32 here) do not change the computation; the legacy class's other keys
        (``cross_attention_dim``, ...) are ignored as diffusers ignores them when it maps
        the class to ``DiTTransformer2DModel`` (weights they would add are refused as extra)."""
        name = config.get("_class_name", "DiTTransformer2DModel")
        if name not in _CLASSES:
            raise _unsupported("_class_name", name, " or ".join(_CLASSES))
        if name == "Transformer2DModel" and config.get("norm_type") != "ada_norm_zero":
            raise _unsupported(
                "norm_type", config.get("norm_type"), "'ada_norm_zero'; a Transformer2DModel with another one is no DiT"
            )
        c = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
        if c["norm_type"] != "ada_norm_zero":
            raise _unsupported("norm_type", c["norm_type"], "'ada_norm_zero'")
        if c["activation_fn"] not in _ACTIVATIONS:
            raise _unsupported("activation_fn", c["activation_fn"], "'gelu-approximate', 'gelu'")
        if c["num_embeds_ada_norm"] is None:
            raise _unsupported("num_embeds_ada_norm", None, "a number of classes (adaLN-Zero needs labels)")
        if c["patch_size"] is None or c["sample_size"] is None:
            raise _unsupported("patch_size", c["patch_size"], "an int with an int sample_size (patched inputs)")
        spec = cls(
            heads=int(c["num_attention_heads"]),
            head_dim=int(c["attention_head_dim"]),
            in_channels=int(c["in_channels"]),
            out_channels=int(c["in_channels"] if c["out_channels"] is None else c["out_channels"]),
            num_layers=int(c["num_layers"]),
            sample_size=int(c["sample_size"]),
            patch_size=int(c["patch_size"]),
            num_classes=int(c["num_embeds_ada_norm"]),
            approximate_gelu=_ACTIVATIONS[c["activation_fn"]],
            attention_bias=bool(c["attention_bias"]),
            norm_affine=bool(c["norm_elementwise_affine"]),
            norm_eps=float(c["norm_eps"]),
        )
        if spec.width % 4:
            raise _unsupported(
                "num_attention_heads * attention_head_dim", spec.width, "a multiple of 4 (2-D sin-cos positions)"
            )
        if spec.sample_size % spec.patch_size:
            raise _unsupported("sample_size", spec.sample_size, f"a multiple of patch_size={spec.patch_size}")
        return spec


def dit_timestep_features(t, dim: int = _TIME_FEATURES):
    """diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=1)``:
    ``[cos(t w_k), sin(t w_k)]`` with ``w_k = exp(-ln(10^4) k / (dim/2 - 1))``, float32.

    Arguments:
      t: ``(B,)`` timesteps (diffusers' discrete 0..999, fractional allowed).
      dim: number of features (even).

    Returns:
      ``(B, dim)`` float32.
    """
    half = dim // 2
    k = jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp((-math.log(10000.0) * k) / (half - 1))
    arg = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def _sincos_1d(pos: np.ndarray, dim: int) -> np.ndarray:
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def dit_pos_embed(width: int, grid: int, base: int) -> np.ndarray:
    """diffusers' fixed 2-D sin-cos position table for a ``grid x grid`` token grid.

    Positions along each axis are ``i / (grid / base)`` (float32, as diffusers computes
    them; ``base`` is the trained grid, ``sample_size // patch_size``, interpolation scale
    1); the sines and cosines are taken in float64. Token ``(row r, column s)`` in row-major
    order gets ``[emb(pos_s), emb(pos_r)]`` with ``emb(q) = [sin(q w), cos(q w)]``, ``w_k =
    10^(-4 k / (width/4))``: the column first.

    Returns:
      ``(grid * grid, width)`` float32.
    """
    pos = np.arange(grid, dtype=np.float32) / np.float32(grid / base)
    cols = np.tile(pos, grid)
    rows = np.repeat(pos, grid)
    emb = np.concatenate([_sincos_1d(cols, width // 2), _sincos_1d(rows, width // 2)], axis=1)
    return emb.astype(np.float32)


def _layer_norm(x, eps: float, scale=None, bias=None):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale[...].astype(jnp.float32) + bias[...].astype(jnp.float32)
    return y


def _modulate(x, shift, scale):
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class _Conditioning(nnx.Module):
    """CombinedTimestepLabelEmbeddings: ``MLP(features(t)) + table[label]`` (float32)."""

    def __init__(self, width: int, num_classes: int, kw: dict, rngs: nnx.Rngs):
        self.linear_1 = nnx.Linear(_TIME_FEATURES, width, **kw, rngs=rngs)
        self.linear_2 = nnx.Linear(width, width, **kw, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.table = nnx.Param(init(rngs.params(), (num_classes + 1, width), kw["param_dtype"]))

    def __call__(self, t_features, labels):
        h = self.linear_2(nnx.silu(self.linear_1(t_features)))
        return h.astype(jnp.float32) + self.table[...][labels].astype(jnp.float32)


class _Block(nnx.Module):
    """BasicTransformerBlock with ``norm_type="ada_norm_zero"`` and no cross-attention."""

    def __init__(self, s: DiTSpec, kw: dict, rngs: nnx.Rngs):
        d = s.width
        self.heads = s.heads
        self.norm_eps = s.norm_eps
        self.approximate = s.approximate_gelu
        self.emb = _Conditioning(d, s.num_classes, {**kw, "dtype": jnp.float32}, rngs)
        self.ada = nnx.Linear(d, 6 * d, **kw, rngs=rngs)
        self.q = nnx.Linear(d, d, use_bias=s.attention_bias, **kw, rngs=rngs)
        self.k = nnx.Linear(d, d, use_bias=s.attention_bias, **kw, rngs=rngs)
        self.v = nnx.Linear(d, d, use_bias=s.attention_bias, **kw, rngs=rngs)
        self.out = nnx.Linear(d, d, **kw, rngs=rngs)
        if s.norm_affine:
            self.norm3_scale = nnx.Param(jnp.ones((d,), kw["param_dtype"]))
            self.norm3_bias = nnx.Param(jnp.zeros((d,), kw["param_dtype"]))
        else:
            self.norm3_scale = self.norm3_bias = None
        self.ff1 = nnx.Linear(d, 4 * d, **kw, rngs=rngs)
        self.ff2 = nnx.Linear(4 * d, d, **kw, rngs=rngs)
        self.dtype = kw["dtype"] or jnp.float32

    def __call__(self, x, c):
        b, n, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(self.ada(nnx.silu(c)).astype(jnp.float32), 6, axis=-1)
        h = _modulate(_layer_norm(x, 1e-6), sh1, sc1).astype(self.dtype)
        split = (b, n, self.heads, d // self.heads)
        a = attention(self.q(h).reshape(split), self.k(h).reshape(split), self.v(h).reshape(split))
        x = x + g1[:, None, :] * self.out(a.reshape(b, n, d)).astype(jnp.float32)
        h = _layer_norm(x, self.norm_eps, self.norm3_scale, self.norm3_bias)
        h = _modulate(h, sh2, sc2).astype(self.dtype)
        h = self.ff2(jax.nn.gelu(self.ff1(h), approximate=self.approximate))
        return x + g2[:, None, :] * h.astype(jnp.float32)


class DiTTransformer2D(nnx.Module):
    """diffusers' ``DiTTransformer2DModel`` in NHWC (see the module docstring).

    Arguments:
      config: the parsed ``config.json`` (or a :class:`DiTSpec`).
      rngs: random initialization (use :func:`from_diffusers` for a checkpoint's weights).
      dtype: compute dtype of the matrix multiplies (None: float32); layer norms, softmax,
        the conditioning and the residual stream stay float32.
      param_dtype: storage dtype of the parameters.

    Call: ``model(x, timesteps, class_labels)`` with ``x`` ``(B, H, H, in_channels)``
    (``H`` a multiple of ``patch_size``; ``sample_size`` is the trained size), ``timesteps``
    ``(B,)`` or a scalar (diffusers' timestep values), ``class_labels`` ``(B,)`` ints in
    ``0..num_classes`` (``num_classes`` is the null class; None: the null class for all). Returns ``(B, H, H,
    out_channels)`` in ``x``'s dtype. ``rngs`` is accepted and ignored (inference only:
    diffusers' dropout is 0 for DiT), so :func:`jdiff.models.to_denoiser` can call it.
    """

    def __init__(self, config, *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
        s = self.spec = config if isinstance(config, DiTSpec) else DiTSpec.from_config(config)
        d, p = s.width, s.patch_size
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype or jnp.float32
        self.patch = nnx.Linear(p * p * s.in_channels, d, **kw, rngs=rngs)
        self.blocks = nnx.List([_Block(s, kw, rngs) for _ in range(s.num_layers)])
        self.proj_out_1 = nnx.Linear(d, 2 * d, **kw, rngs=rngs)
        self.proj_out_2 = nnx.Linear(d, p * p * s.out_channels, **kw, rngs=rngs)

    @property
    def prediction_channels(self) -> int:
        """How many leading output channels are the prediction (the rest, with learned
        sigma, are the variance values): see :attr:`DiTSpec.prediction_channels`."""
        return self.spec.prediction_channels

    def split_output(self, out):
        """``(prediction, variance values or None)`` of an output ``(..., out_channels)``."""
        k = self.prediction_channels
        return out[..., :k], (out[..., k:] if k < out.shape[-1] else None)

    def _check(self, x, timesteps, class_labels):
        s = self.spec
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[1] != x.shape[2] or x.shape[1] % s.patch_size or x.shape[3] != s.in_channels:
            raise ValueError(
                f"DiT expects square NHWC latents (B, H, H, {s.in_channels}) with H a multiple of "
                f"patch_size={s.patch_size} (trained H={s.sample_size}), got {x.shape}"
            )
        b = x.shape[0]
        t = check_time(timesteps, b, "DiT timesteps").astype(jnp.float32)
        y = None if class_labels is None else jnp.asarray(class_labels)
        y = check_labels(jnp.broadcast_to(y, (b,)) if y is not None and y.ndim == 0 else y, b, s.num_classes)
        return x, t, y

    def __call__(self, x, timesteps, class_labels, *, rngs=None):
        x, t, y = self._check(x, timesteps, class_labels)
        s, p = self.spec, self.spec.patch_size
        size = x.shape[1]
        n = size // p
        h = self.patch(patchify(x.astype(self.dtype), p)).astype(jnp.float32)
        h = h + jnp.asarray(dit_pos_embed(s.width, n, s.sample_size // p))[None]
        t_features = dit_timestep_features(t)
        conds = [blk.emb(t_features, y) for blk in self.blocks]
        for blk, c in zip(self.blocks, conds, strict=True):
            h = blk(h, c)
        shift, scale = jnp.split(self.proj_out_1(nnx.silu(conds[0])).astype(jnp.float32), 2, axis=-1)
        h = _modulate(_layer_norm(h, 1e-6), shift, scale).astype(self.dtype)
        return unpatchify(self.proj_out_2(h), p, size, size).astype(x.dtype)


def _put(var, value) -> None:
    var.set_value(jnp.asarray(value, var.get_value().dtype))


def _put_linear(layer: nnx.Linear, pair) -> None:
    kernel, bias = pair
    _put(layer.kernel, kernel)
    if bias is not None:
        _put(layer.bias, bias)


def from_diffusers(
    config: dict, weights: Weights, *, dtype: Any = None, param_dtype: Any = jnp.float32
) -> DiTTransformer2D:
    """A :class:`DiTTransformer2D` holding a diffusers ``DiTTransformer2DModel``'s weights.

    Arguments:
      config: the transformer folder's parsed ``config.json``.
      weights: its state dict (PyTorch layout); every tensor is taken shape-checked and
        :meth:`Weights.finish` refuses any left over.
      dtype, param_dtype: see :class:`DiTTransformer2D`.

    Returns:
      The module, ready to call.

    Raises:
      UnsupportedModelError: a config value this module does not implement (named).
      WeightError: a missing, extra or mis-shaped weight (key and both shapes named).
    """
    s = DiTSpec.from_config(config)
    model = nnx.eval_shape(lambda: DiTTransformer2D(s, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    d, p, c = s.width, s.patch_size, s.in_channels
    kernel, bias = weights.conv("pos_embed.proj", c, d, p)  # HWIO (p, p, c, d): patch order
    _put_linear(model.patch, (kernel.reshape(p * p * c, d), bias))
    for i, blk in enumerate(model.blocks):
        pre = f"transformer_blocks.{i}"
        emb = f"{pre}.norm1.emb"
        _put_linear(blk.emb.linear_1, weights.linear(f"{emb}.timestep_embedder.linear_1", _TIME_FEATURES, d))
        _put_linear(blk.emb.linear_2, weights.linear(f"{emb}.timestep_embedder.linear_2", d, d))
        _put(blk.emb.table, weights.take(f"{emb}.class_embedder.embedding_table.weight", (s.num_classes + 1, d)))
        _put_linear(blk.ada, weights.linear(f"{pre}.norm1.linear", d, 6 * d))
        for name, layer in (("to_q", blk.q), ("to_k", blk.k), ("to_v", blk.v)):
            _put_linear(layer, weights.linear(f"{pre}.attn1.{name}", d, d, bias=s.attention_bias))
        _put_linear(blk.out, weights.linear(f"{pre}.attn1.to_out.0", d, d))
        if s.norm_affine:
            scale, shift = weights.norm(f"{pre}.norm3", d)
            _put(blk.norm3_scale, scale)
            _put(blk.norm3_bias, shift)
        _put_linear(blk.ff1, weights.linear(f"{pre}.ff.net.0.proj", d, 4 * d))
        _put_linear(blk.ff2, weights.linear(f"{pre}.ff.net.2", 4 * d, d))
    _put_linear(model.proj_out_1, weights.linear("proj_out_1", d, 2 * d))
    _put_linear(model.proj_out_2, weights.linear("proj_out_2", d, p * p * s.out_channels))
    weights.finish()
    return model
