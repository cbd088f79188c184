"""diffusers' ``UNet2DModel`` (the DDPM / DDIM family) as a jdiff NNX module in NHWC.

The network is the U-Net of DDPM (Ho et al., "Denoising Diffusion Probabilistic Models",
NeurIPS 2020, App. B: a PixelCNN++ / Wide-ResNet U-Net with group normalization,
self-attention at chosen resolutions and a sinusoidal time embedding), in the form and
with the weight names of diffusers' ``UNet2DModel``, so the published checkpoints
(``google/ddpm-cifar10-32``, ``google/ddpm-celebahq-256``, ``google/ddpm-church-256``,
the DDIM / PNDM pipelines that reuse them, class-conditional variants) load unchanged.
It is built from the folder's ``config.json`` keys alone:

- input: ``center_input_sample`` (``2 x - 1``), a 3x3 convolution to
  ``block_out_channels[0]``;
- time: ``time_embedding_type`` ``"positional"`` (``block_out_channels[0]`` sinusoidal
  features of the timestep, frequencies ``10000^(-i / (half - freq_shift))``, sines then
  cosines, or cosines first with ``flip_sin_to_cos``) or ``"fourier"`` (Gaussian Fourier
  features of ``log t``, Song et al. 2021; the output is then divided by ``t``), then
  linear, SiLU, linear to ``time_embedding_dim`` (default ``4 * block_out_channels[0]``);
- class: ``num_class_embeds`` (a table added to the time embedding), or
  ``class_embed_type`` ``"timestep"`` (the labels through the time features and their own
  MLP) or ``"identity"`` (the labels are embeddings already);
- one down block per ``down_block_types`` entry (``DownBlock2D``, ``AttnDownBlock2D``) of
  ``layers_per_block`` residual blocks to ``block_out_channels[i]``, each but the last
  followed by a downsampler (``downsample_type`` ``"conv"`` with ``downsample_padding``, or
  ``"resnet"`` in attention blocks); the middle (``UNetMidBlock2D``: residual, attention
  unless ``add_attention`` is false, residual; ``mid_block_scale_factor`` divides each
  residual sum); the mirror-image up blocks (``UpBlock2D``, ``AttnUpBlock2D``) of
  ``layers_per_block + 1`` residual blocks, each taking one skip activation, each but the
  last followed by an upsampler; GroupNorm, SiLU and a 3x3 output convolution.
- residual blocks: ``act_fn``, ``norm_num_groups`` / ``norm_eps``,
  ``resnet_time_scale_shift`` ``"default"`` or ``"scale_shift"``; attention: heads of
  ``attention_head_dim`` channels (one head of all channels when it is null).

The blocks are in :mod:`jdiff.interop._unet2d_blocks`. Call as
``model(x, timesteps, class_labels=None)`` with NHWC ``x`` and diffusers' timesteps (e.g.
``0..999``, fractional allowed); it returns an NHWC array of ``x``'s dtype. ``dropout``
is not applied (inference; the ``rngs`` argument exists for :func:`jdiff.models.functional`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdiff.interop._convert import UnsupportedModelError, Weights
from jdiff.interop._unet2d_blocks import (
    ACTIVATIONS,
    Conv,
    DownBlock,
    GroupNorm,
    Init,
    Linear,
    MidBlock,
    UpBlock,
    put,
)
from jdiff.models._common import check_time

__all__ = ["UNet2DModel", "UNet2DSpec", "from_diffusers", "unet2d_spec"]

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNet2DSpec:
    """A ``UNet2DModel`` config.json resolved: diffusers' defaults filled in, values checked.

    Build one with :func:`unet2d_spec`; the attributes are the config keys of the same
    names (``scale_shift`` is ``resnet_time_scale_shift == "scale_shift"``, ``attention``
    lists per level whether the down block attends, ``mid_block`` whether there is one,
    ``time_embedding_dim`` is resolved, ``class_embedding`` is None, ``"table"``,
    ``"timestep"`` or ``"identity"``)."""

    sample_size: Any
    in_channels: int
    out_channels: int
    center_input_sample: bool
    time_embedding_type: str
    time_embedding_dim: int
    freq_shift: float
    flip_sin_to_cos: bool
    block_out_channels: tuple[int, ...]
    attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    layers_per_block: int
    mid_block: bool
    mid_block_scale_factor: float
    downsample_padding: int
    downsample_type: str
    upsample_type: str
    act_fn: str
    attention_head_dim: int | None
    norm_num_groups: int
    attn_norm_num_groups: int | None
    norm_eps: float
    scale_shift: bool
    add_attention: bool
    class_embedding: str | None
    num_class_embeds: int | None

    @property
    def time_features(self) -> int:
        """Width of the time features (twice the first channels for Fourier features)."""
        c = self.block_out_channels[0]
        return 2 * c if self.time_embedding_type == "fourier" else c


def _choice(config: Mapping, key: str, default, supported: tuple):
    value = config.get(key, default)
    if value not in supported:
        raise UnsupportedModelError(
            f"UNet2DModel config {key}={value!r} is not supported; supported: " + ", ".join(repr(s) for s in supported)
        )
    return value


def _blocks(config: Mapping, key: str, default: tuple, supported: tuple) -> tuple[str, ...]:
    types = tuple(config.get(key, default))
    # diffusers reads a "UNetRes" prefix as the same block (UNetResDownBlock2D = DownBlock2D)
    plain = tuple(t[7:] if t.startswith("UNetRes") else t for t in types)
    bad = [t for t, p in zip(types, plain, strict=True) if p not in supported]
    if bad:
        raise UnsupportedModelError(
            f"UNet2DModel {key} {', '.join(bad)} not supported; supported: {', '.join(supported)}"
        )
    return plain


def unet2d_spec(config: Mapping) -> UNet2DSpec:
    """Resolve and check a diffusers ``UNet2DModel`` config (the parsed ``config.json``).

    Arguments:
      config: the config's keys; absent ones take diffusers' defaults.

    Returns:
      A :class:`UNet2DSpec`.

    Raises:
      UnsupportedModelError: another model class, or a block type or option jdiff does not
        implement (the message names it and what is supported).
      ValueError: keys that contradict each other (lists of different lengths, channels
        not divisible by the group count).
    """
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise UnsupportedModelError(f"config _class_name {name!r} is not UNet2DModel")
    down = _blocks(config, "down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * 3, DOWN_BLOCKS)
    up = _blocks(config, "up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",), UP_BLOCKS)
    channels = tuple(int(c) for c in config.get("block_out_channels", (224, 448, 672, 896)))
    if not (len(down) == len(up) == len(channels)) or not channels:
        raise ValueError(
            f"UNet2DModel config has {len(down)} down_block_types, {len(up)} up_block_types and "
            f"{len(channels)} block_out_channels; they must be equally many (at least one)"
        )
    mid = _choice(config, "mid_block_type", "UNetMidBlock2D", ("UNetMidBlock2D", None))
    time_type = _choice(config, "time_embedding_type", "positional", ("positional", "fourier"))
    class_type = _choice(config, "class_embed_type", None, (None, "timestep", "identity"))
    num_classes = config.get("num_class_embeds")
    if class_type is None and num_classes is not None:
        class_type = "table"
    groups = config.get("norm_num_groups", 32)
    if groups is None:
        raise UnsupportedModelError("UNet2DModel config norm_num_groups=None is not supported; supported: an integer")
    attn_groups = config.get("attn_norm_num_groups")
    bad = [c for c in channels if c % groups or (attn_groups and c % attn_groups)]
    if bad:
        raise ValueError(f"UNet2DModel block_out_channels {bad} are not divisible by norm_num_groups={groups}")
    head_dim = config.get("attention_head_dim", 8)
    sample = config.get("sample_size")
    return UNet2DSpec(
        sample_size=tuple(sample) if isinstance(sample, list | tuple) else sample,
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        center_input_sample=bool(config.get("center_input_sample", False)),
        time_embedding_type=time_type,
        time_embedding_dim=int(config.get("time_embedding_dim") or 4 * channels[0]),
        freq_shift=float(config.get("freq_shift", 0)),
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
        block_out_channels=channels,
        attention=tuple(t == "AttnDownBlock2D" for t in down),
        up_attention=tuple(t == "AttnUpBlock2D" for t in up),
        layers_per_block=int(config.get("layers_per_block", 2)),
        mid_block=mid is not None,
        mid_block_scale_factor=float(config.get("mid_block_scale_factor", 1.0)),
        downsample_padding=int(config.get("downsample_padding", 1)),
        downsample_type=_choice(config, "downsample_type", "conv", ("conv", "resnet")),
        upsample_type=_choice(config, "upsample_type", "conv", ("conv", "resnet")),
        act_fn=_choice(config, "act_fn", "silu", tuple(ACTIVATIONS)),
        attention_head_dim=None if head_dim is None else int(head_dim),
        norm_num_groups=int(groups),
        attn_norm_num_groups=None if attn_groups is None else int(attn_groups),
        norm_eps=float(config.get("norm_eps", 1e-5)),
        scale_shift=_choice(config, "resnet_time_scale_shift", "default", ("default", "scale_shift")) == "scale_shift",
        add_attention=bool(config.get("add_attention", True)),
        class_embedding=class_type,
        num_class_embeds=None if num_classes is None else int(num_classes),
    )


def _sinusoidal(t, dim: int, flip: bool, shift: float):
    """diffusers' ``get_timestep_embedding`` in float32: ``t * 10000^(-i / (half - shift))``
    for ``i < half = dim // 2``; sines then cosines (cosines first with ``flip``); a zero
    column when ``dim`` is odd. The frequencies are rounded once from float64, as torch's
    float32 ``exp`` of the same float32 exponents."""
    half = dim // 2
    exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half - shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    arg = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    sin, cos = jnp.sin(arg), jnp.cos(arg)
    out = jnp.concatenate([cos, sin] if flip else [sin, cos], axis=-1)
    return jnp.pad(out, ((0, 0), (0, dim % 2)))


class _TimestepEmbedding(nnx.Module):
    """diffusers' ``TimestepEmbedding``: linear, SiLU, linear."""

    def __init__(self, d_in: int, d: int, init: Init):
        self.linear_1 = Linear(d_in, d, init)
        self.linear_2 = Linear(d, d, init)

    def __call__(self, f):
        return self.linear_2(jax.nn.silu(self.linear_1(f)))

    def load(self, w: Weights, prefix: str) -> None:
        self.linear_1.load(w, f"{prefix}.linear_1")
        self.linear_2.load(w, f"{prefix}.linear_2")


class _Embed(nnx.Module):
    """A class table ``(num, d)`` (``torch.nn.Embedding``)."""

    def __init__(self, num: int, d: int, init: Init):
        self.num, self.d, self.dtype = num, d, init.dtype
        self.weight = init.normal((num, d), 1.0)

    def __call__(self, y):
        return jnp.take(self.weight[...], y, axis=0).astype(self.dtype)

    def load(self, w: Weights, prefix: str) -> None:
        put(self.weight, w.take(f"{prefix}.weight", (self.num, self.d)))


def _host_rng(rngs: nnx.Rngs) -> np.random.Generator | None:
    """A NumPy generator seeded from ``rngs``' params stream (random init on the host);
    None under a trace (``nnx.eval_shape``: shapes are all that is asked for)."""
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key).ravel().tolist())


class UNet2DModel(nnx.Module):
    """diffusers' ``UNet2DModel`` in NHWC (see the module docstring), built from a config.

    Arguments:
      config: the parsed ``config.json`` (a mapping) or a :class:`UNet2DSpec`.
      dtype: compute dtype of convolutions and linear maps (None: float32; e.g.
        ``jnp.bfloat16``); normalizations, softmax and time features stay float32.
      param_dtype: parameter dtype.
      rngs: initializes the parameters at random (drawn on the host with NumPy, seeded
        from ``rngs``: weights normal with standard deviation ``1/sqrt(fan_in)``, biases 0,
        norm scales 1); None builds shape-only placeholders that :meth:`load` fills, which
        is what :func:`from_diffusers` does.

    Call ``model(x, timesteps, class_labels=None)``: ``x`` ``(B, H, W, in_channels)`` with
    ``H`` and ``W`` divisible by ``2^(levels - 1)``; ``timesteps`` a scalar or ``(B,)``
    (diffusers' time values); ``class_labels`` ``(B,)`` integers below ``num_class_embeds``
    (``"timestep"``: numbers; ``"identity"``: ``(B, time_embedding_dim)``) for a
    class-conditional config, else None. Returns ``(B, H, W, out_channels)`` in ``x``'s dtype.
    """

    def __init__(self, config, *, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        s = config if isinstance(config, UNet2DSpec) else unet2d_spec(config)
        self.spec = s
        init = Init(None if rngs is None else _host_rng(rngs), param_dtype, dtype)
        res = dict(groups=s.norm_num_groups, eps=s.norm_eps, act=s.act_fn, scale_shift=s.scale_shift)
        res["output_scale_factor"] = 1.0
        attn = dict(groups=s.norm_num_groups, eps=s.norm_eps, rescale=1.0)
        ch, temb, levels = s.block_out_channels, s.time_embedding_dim, len(s.block_out_channels)
        self.conv_in = Conv(s.in_channels, ch[0], 3, init)
        if s.time_embedding_type == "fourier":
            self.fourier_weight = init.normal((ch[0],), 16.0)  # diffusers' GaussianFourierProjection(scale=16)
        self.time_embedding = _TimestepEmbedding(s.time_features, temb, init)
        class_embedding = None
        if s.class_embedding == "table":
            class_embedding = _Embed(s.num_class_embeds, temb, init)
        elif s.class_embedding == "timestep":
            class_embedding = _TimestepEmbedding(s.time_features, temb, init)
        self.class_embedding = class_embedding

        def heads(c):
            return s.attention_head_dim or c

        down, skips = [], [ch[0]]
        for i in range(levels):
            cin, cout, last = ch[max(i - 1, 0)], ch[i], i == levels - 1
            # DownBlock2D always downsamples with a convolution (diffusers ignores downsample_type there)
            sampler = None if last else (s.downsample_type if s.attention[i] else "conv")
            head_dim = heads(cout) if s.attention[i] else None
            down.append(
                DownBlock(
                    cin,
                    cout,
                    temb,
                    init,
                    layers=s.layers_per_block,
                    head_dim=head_dim,
                    downsample=sampler,
                    padding=s.downsample_padding,
                    res=res,
                    attn=attn,
                )
            )
            skips += [cout] * s.layers_per_block + ([] if last else [cout])
        self.down_blocks = nnx.List(down)
        mid_block = None
        if s.mid_block:
            # diffusers: no group norm in the middle attention under scale_shift unless attn_norm_num_groups says so
            groups = s.attn_norm_num_groups or (None if s.scale_shift else s.norm_num_groups)
            mid_block = MidBlock(
                ch[-1],
                temb,
                init,
                head_dim=heads(ch[-1]),
                add_attention=s.add_attention,
                res=dict(res, output_scale_factor=s.mid_block_scale_factor),
                attn=dict(attn, rescale=s.mid_block_scale_factor, groups=groups),
            )
        self.mid_block = mid_block
        up, prev = [], ch[-1]
        for i in range(levels):
            cout, last, n = ch[levels - 1 - i], i == levels - 1, s.layers_per_block + 1
            taken, skips = skips[-n:][::-1], skips[:-n]
            sampler = None if last else (s.upsample_type if s.up_attention[i] else "conv")
            head_dim = heads(cout) if s.up_attention[i] else None
            up.append(UpBlock(prev, cout, taken, temb, init, head_dim=head_dim, upsample=sampler, res=res, attn=attn))
            prev = cout
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = GroupNorm(ch[0], s.norm_num_groups, s.norm_eps, init)
        self.conv_out = Conv(ch[0], s.out_channels, 3, init)
        self.dtype = init.dtype

    def _features(self, t):
        s = self.spec
        if s.time_embedding_type == "fourier":
            w = self.fourier_weight[...].astype(jnp.float32)
            arg = jnp.log(t.astype(jnp.float32))[:, None] * w[None, :] * 2.0 * np.float32(math.pi)
            return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)
        return _sinusoidal(t, s.block_out_channels[0], s.flip_sin_to_cos, s.freq_shift)

    def _check_labels(self, class_labels, batch: int):
        """The labels as an array (None for an unconditional model), checked before any compute."""
        kind = self.spec.class_embedding
        if kind is None:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional UNet2DModel (no class embedding)")
            return None
        if class_labels is None:
            raise ValueError(f"this UNet2DModel is class-conditional ({kind}): pass class_labels")
        y = jnp.asarray(class_labels)
        want = (batch, self.spec.time_embedding_dim) if kind == "identity" else (batch,)
        if y.shape != want:
            raise ValueError(f"class_labels must have shape {want} ({kind} class embedding), got {y.shape}")
        if kind == "table" and not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"class_labels must be integers below {self.spec.num_class_embeds}, not {y.dtype}")
        return y

    def _class_embedding(self, y):
        kind = self.spec.class_embedding
        if kind == "identity":
            return y.astype(self.dtype)
        if kind == "timestep":
            return self.class_embedding(self._features(y).astype(self.dtype))
        return self.class_embedding(y)

    def __call__(self, x, timesteps, class_labels=None, *, rngs=None):
        s = self.spec
        x = jnp.asarray(x)
        factor = 1 << (len(s.block_out_channels) - 1)
        if x.ndim != 4 or x.shape[-1] != s.in_channels or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"UNet2DModel expects NHWC images (B, H, W, {s.in_channels}) with H and W divisible by {factor}, "
                f"got {x.shape}"
            )
        b = x.shape[0]
        t = check_time(timesteps, b, "timesteps")
        y = self._check_labels(class_labels, b)
        h = x.astype(self.dtype)
        if s.center_input_sample:
            h = 2 * h - 1.0
        emb = self.time_embedding(self._features(t).astype(self.dtype))
        if y is not None:
            emb = emb + self._class_embedding(y)
        h = self.conv_in(h)
        skips = [h]
        for block in self.down_blocks:
            h, out = block(h, emb)
            skips += out
        if self.mid_block is not None:
            h = self.mid_block(h, emb)
        for block in self.up_blocks:
            h = block(h, skips, emb)
        h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
        if s.time_embedding_type == "fourier":
            h = h.astype(jnp.float32) / t.astype(jnp.float32)[:, None, None, None]
        return h.astype(x.dtype)

    def load(self, w: Weights) -> None:
        """Set every parameter from ``w`` (diffusers' key names, shapes checked)."""
        s = self.spec
        self.conv_in.load(w, "conv_in")
        if s.time_embedding_type == "fourier":
            put(self.fourier_weight, w.take("time_proj.weight", (s.block_out_channels[0],)))
        self.time_embedding.load(w, "time_embedding")
        if self.class_embedding is not None:
            self.class_embedding.load(w, "class_embedding")
        for i, block in enumerate(self.down_blocks):
            block.load(w, f"down_blocks.{i}")
        if self.mid_block is not None:
            self.mid_block.load(w, "mid_block")
        for i, block in enumerate(self.up_blocks):
            block.load(w, f"up_blocks.{i}")
        self.conv_norm_out.load(w, "conv_norm_out")
        self.conv_out.load(w, "conv_out")


def from_diffusers(config: Mapping, weights, *, dtype: Any = None, param_dtype: Any = jnp.float32) -> UNet2DModel:
    """A diffusers ``UNet2DModel`` checkpoint as a jdiff :class:`UNet2DModel`.

    Arguments:
      config: the parsed ``config.json``.
      weights: a :class:`~jdiff.interop.Weights` (or a mapping ``{key: array}`` in PyTorch
        layout, e.g. from ``safetensors.numpy.load_file`` or
        :func:`jdiff.features.load_torch_state_dict`). Old checkpoints' attention names
        (``query``, ``key``, ``value``, ``proj_attn``) are read as diffusers reads them.
      dtype: compute dtype (None: float32); param_dtype: parameter dtype.

    Returns:
      The module with the checkpoint's weights (built without a random initialization:
        placeholders replaced by the checkpoint's tensors).

    Raises:
      UnsupportedModelError: a config key or block type jdiff does not implement.
      WeightError: a missing or left-over weight, or one whose shape the config does not
        imply (the message names the key and both shapes).
    """
    w = weights if isinstance(weights, Weights) else Weights(weights)
    spec = unet2d_spec(config)
    model = UNet2DModel(spec, dtype=dtype, param_dtype=param_dtype)  # placeholders, filled by load
    model.load(w)
    w.finish()
    unset = [p for p, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if unset:  # a loader that forgot a parameter: a bug here, not in the checkpoint
        raise AssertionError(f"UNet2DModel parameters not loaded: {unset[:3]}")
    return model
