"""Early exit with learned uncertainty (DeeDiff) for a DiT.

Tang et al., "DeeDiff: Dynamic Uncertainty-Aware Early Exiting for Accelerating Diffusion
Model Generation" (2023): after each transformer block ``i`` a small *uncertainty
estimation module* predicts how far an output read off the block's tokens would be from
the full network's; sampling stops at the first block that is confident enough and maps
its tokens to the output. Here:

- **Heads** (:func:`exit_heads`): a separate pytree (a dict of arrays stacked over the
  ``E = depth - 1`` exits), so the denoiser is unchanged. Exit ``i`` (after block ``i``,
  ``0 <= i < E``) has an uncertainty head, a token-wise MLP conditioned like the model and
  pooled over tokens::

      a_i = mean_tokens gelu(LN(h_i) W_h[i] + SiLU(c) W_c[i] + b_1[i])
      u_i = sigmoid(a_i . w_2[i] + b_2[i])          # one number in (0, 1) per sample

  (``c`` the model's conditioning vector, ``LN`` a layer norm without affine), and an
  exit output through the model's own output layer (DeeDiff's shared output layer) after
  a zero-initialized linear adapter, ``y_i = head(h_i + LN(h_i) A[i])``, so an untrained
  adapter reads the block's tokens with the model's head as they are.
- **Training** (:func:`exit_loss`, on :mod:`jdiff.train`'s seam ``loss_fn(params, batch,
  keys, *, frozen)``): the denoiser's parameters are *frozen* (``frozen=``), only the heads
  learn. With ``e_i = mean_pixels (y_i - y_L)^2`` the squared error of exiting at block
  ``i`` against the full output ``y_L``, the loss is DeeDiff's uncertainty loss (their
  Eq. 7-8, target ``tanh`` of the error, here of its root mean square) plus its
  uncertainty-aware layer-wise loss (Eq. 9) toward the full output::

      L = mean_batch sum_i [ (u_i - tanh(sqrt(e_i)))^2 + lambda (1 - sg(u_i)) e_i ]

  (``sg`` stop-gradient: the weight does not push ``u_i`` up; DeeDiff fine-tunes the
  backbone jointly and regresses the data target; with the backbone frozen the full
  output is what an exit can at best reproduce, and it is what the plain sampler uses).
- **Sampling** (:func:`early_exit`, a carried :class:`~jdiff.accelerate.Method`): each
  network call runs the blocks in order in a ``lax.while_loop`` (``lax.switch`` picks the
  block, so the skipped blocks are not computed) and stops after the first block whose
  uncertainty is below ``threshold`` for *every* sample of the call's batch (one scalar
  decision per call). The exit needs no memory across steps; it is a carried method so
  that its counters (calls, full calls, blocks computed, exits per block) travel in the
  sampler's carry and come back with ``report=True``.

Cost per call: ``k`` of the ``depth`` blocks plus ``k`` uncertainty heads (``O(N d w)``
each, ``w`` the head width: a small fraction of a block) and the output layer (with one
``d x d`` adapter when exiting early). Threshold 0 is the plain call (the plain sampler
bit for bit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdiff._param import Denoiser
from jdiff._random import is_key_batch, per_sample_keys
from jdiff.accelerate._carry import Method
from jdiff.models import Apply, internals
from jdiff.models._internals import Internals
from jdiff.train import noise_batch

__all__ = ["EarlyExit", "early_exit", "exit_heads", "exit_outputs", "exit_loss", "save_exit_heads", "load_exit_heads"]

_HEAD_KEYS = ("wh", "wc", "b1", "w2", "b2")


def _dit_internals(model) -> tuple[Internals, object]:
    """``(net, params)`` of a DiT given as a Denoiser, an nnx module or ``(apply, params)``."""
    if isinstance(model, Denoiser):
        if not isinstance(model.apply_fn, Apply) or model.params is None:
            raise TypeError("early exit needs a denoiser of a jdiff DiT (jdiff.models.to_denoiser builds one)")
        net, params = internals(model.apply_fn, model.params), model.params
    elif isinstance(model, nnx.Module):
        net, params = internals(model), nnx.state(model)
    else:
        raise TypeError(f"early exit takes a jdiff DiT (its module or Denoiser), got {type(model).__name__}")
    if net.kind != "dit":
        raise ValueError(f"early exit is defined for a DiT (block by block); this model is a {net.kind}")
    if net.depth < 2:
        raise ValueError(f"early exit needs a DiT of depth >= 2, got depth {net.depth}")
    return net, params


def _hidden(net: Internals, params) -> int:
    return nnx.merge(net.graphdef, params, copy=True).config.hidden_dim


def exit_heads(model, *, width: int = 64, adapters: bool = True, seed: int = 0) -> dict:
    """Fresh DeeDiff heads for the exits of a DiT (see the module docstring).

    Args:
      model: the DiT: its :class:`jdiff.Denoiser` (``jdiff.models.to_denoiser``,
        ``jdiff.presets.pretrained``) or the module.
      width: hidden width ``w`` of each uncertainty head.
      adapters: give each exit a zero-initialized ``d x d`` adapter before the model's
        output layer (trained by the layer-wise loss); ``False``: exits read the block's
        tokens with the output layer as it is.
      seed: initialization seed.

    Returns:
      A dict of float32 arrays stacked over the ``E = depth - 1`` exits: ``wh, wc (E, d,
      w)``, ``b1 (E, w)``, ``w2 (E, w)``, ``b2 (E,)`` and with adapters ``adapt (E, d, d)``.
      The uncertainty starts near 0.5.
    """
    net, params = _dit_internals(model)
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    d, e = _hidden(net, params), net.depth - 1
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    heads = {
        "wh": jax.random.normal(k1, (e, d, width)) / math.sqrt(d),
        "wc": jax.random.normal(k2, (e, d, width)) / math.sqrt(d),
        "b1": jnp.zeros((e, width)),
        "w2": 0.1 * jax.random.normal(k3, (e, width)) / math.sqrt(width),
        "b2": jnp.zeros((e,)),
    }
    if adapters:
        heads["adapt"] = jnp.zeros((e, d, d))
    return heads


def _check_heads(heads, d: int, depth: int):
    if not isinstance(heads, dict) or not set(_HEAD_KEYS) <= set(heads):
        raise TypeError(f"exit heads are the dict of jdiff.accelerate.exit_heads (keys {_HEAD_KEYS} [+ 'adapt'])")
    e = depth - 1
    w = np.shape(heads["b1"])[-1] if np.ndim(heads["b1"]) == 2 else -1
    want = {"wh": (e, d, w), "wc": (e, d, w), "b1": (e, w), "w2": (e, w), "b2": (e,)}
    if "adapt" in heads:
        want["adapt"] = (e, d, d)
    for k, shape in want.items():
        if tuple(np.shape(heads[k])) != shape:
            raise ValueError(
                f"exit heads do not fit this DiT (depth {depth}, width {d}): {k} has shape "
                f"{tuple(np.shape(heads[k]))}, expected {shape}"
            )


def _ln(h):
    h = h.astype(jnp.float32)
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mu), axis=-1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(var + 1e-6)


def _uncertainty(heads, i, h, ctx):
    """``u_i``: ``(B,)`` in (0, 1) from block ``i``'s tokens ``h`` (``i`` may be traced)."""
    c = nnx.silu(ctx.cvec.astype(jnp.float32))
    p = {k: jnp.asarray(heads[k])[i] for k in _HEAD_KEYS}
    a = _ln(h) @ p["wh"] + (c @ p["wc"])[:, None, :] + p["b1"]
    a = jnp.mean(nnx.gelu(a, approximate=True), axis=1)
    return jax.nn.sigmoid(a @ p["w2"] + p["b2"])


def _adapt(heads, i, h):
    if "adapt" not in heads:
        return h
    return h + (_ln(h) @ jnp.asarray(heads["adapt"])[i]).astype(h.dtype)


def exit_outputs(net: Internals, params, heads, x, t, cond=None):
    """Every exit's output and uncertainty for one network call (all blocks computed).

    Args:
      net: the DiT's :class:`~jdiff.models.Internals` (``jdiff.models.internals``).
      params: the DiT's parameters; heads: from :func:`exit_heads`.
      x, t, cond: the network's inputs (``t`` the network's own time input).

    Returns:
      ``(outs, u)``: ``outs (depth, B, ...)`` the exit outputs after blocks ``0..depth-2``
      then the model's own output (equal to ``net(params, x, t, cond)``); ``u (depth - 1,
      B)`` the uncertainties.
    """
    h, ctx = net.embed(params, x, t, cond)
    outs, us = [], []
    for i in range(net.depth):
        h = net.block(params, i, h, ctx)
        if i < net.depth - 1:
            us.append(_uncertainty(heads, i, h, ctx))
            outs.append(net.head(params, _adapt(heads, i, h), ctx))
    outs.append(net.head(params, h, ctx))
    return jnp.stack(outs), jnp.stack(us)


def exit_loss(
    denoiser: Denoiser,
    *,
    layer_weight: float = 1.0,
    label_dropout: float = 0.0,
    num_classes: int | None = None,
    data_key: str = "x",
    label_key: str | None = "label",
):
    """DeeDiff's loss for the exit heads of a frozen DiT: ``loss_fn(heads, batch, keys, *,
    frozen) -> (loss, metrics)`` for ``jdiff.train.train(loss_fn, heads, data, ...,
    frozen=denoiser.params)``.

    Args:
      denoiser: the DiT's denoiser (its process and time input; its parameters come in as
        ``frozen``, and only their structure is read here).
      layer_weight: ``lambda``, the weight of the uncertainty-aware layer-wise loss (it
        trains the adapters; 0 trains the uncertainty heads only).
      label_dropout, num_classes: replace a label by the null class ``num_classes`` with
        this probability (so the heads also see the unconditional calls of
        classifier-free guidance).
      data_key, label_key: the batch's keys (data ``(B, H, W, C)``, labels ``(B,)``).

    Each sample's ``(t, eps, x_t)`` is :func:`jdiff.train.noise_batch` of its key
    (uniform time), the label coin ``fold_in(key_i, 0x657874)``. The loss is the module
    docstring's ``L`` (a batch mean); metrics: ``loss``, ``uncertainty`` (the first term),
    ``layer`` (the second, unweighted) and ``exit_rms`` (the mean over exits of the root
    mean square error of exiting).
    """
    net, _ = _dit_internals(denoiser)
    if label_dropout and num_classes is None:
        raise ValueError("label_dropout needs num_classes (the null class's label)")
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")

    def loss_fn(params, batch, keys, *, frozen):
        if not isinstance(batch, dict) or data_key not in batch:
            raise ValueError(f"batch must be a dict with the data under {data_key!r}")
        x0 = jnp.asarray(batch[data_key])
        n = x0.shape[0]
        t, _, xt = noise_batch(denoiser.process, x0, keys)
        cond = batch.get(label_key) if label_key else None
        if cond is not None and label_dropout > 0:
            ks = keys if is_key_batch(keys) else per_sample_keys(keys, n)
            coin = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0x657874)))(ks)
            cond = jnp.where(coin < label_dropout, jnp.asarray(num_classes, jnp.asarray(cond).dtype), cond)
        outs, u = exit_outputs(net, frozen, params, xt, denoiser.model_time(t), cond)
        outs = outs.astype(jnp.float32).reshape(outs.shape[0], n, -1)
        err = jnp.mean(jnp.square(outs[:-1] - jax.lax.stop_gradient(outs[-1])), axis=-1)  # (E, B)
        rms = jnp.sqrt(jax.lax.stop_gradient(err))
        l_u = jnp.mean(jnp.sum(jnp.square(u - jnp.tanh(rms)), axis=0))
        l_layer = jnp.mean(jnp.sum((1.0 - jax.lax.stop_gradient(u)) * err, axis=0))
        loss = l_u + layer_weight * l_layer
        return loss, {"loss": loss, "uncertainty": l_u, "layer": l_layer, "exit_rms": jnp.mean(rms)}

    return loss_fn


@dataclasses.dataclass(frozen=True, eq=False)
class _Heads:
    """Exit heads as constants of the compiled sampler: numpy arrays, compared and hashed
    by content (a method is a static argument of the sampler's jit)."""

    arrays: dict
    digest: str

    @classmethod
    def of(cls, heads) -> _Heads:
        if isinstance(heads, _Heads):
            return heads
        if not isinstance(heads, dict):
            raise TypeError(f"heads must be the dict of jdiff.accelerate.exit_heads, got {type(heads).__name__}")
        if any(isinstance(a, jax.core.Tracer) for a in heads.values()):
            raise TypeError("exit heads must be concrete arrays (they are constants of the compiled sampler)")
        arrays = {k: np.asarray(heads[k], np.float32) for k in sorted(heads)}
        h = hashlib.sha1()
        for k, a in arrays.items():
            h.update(f"{k}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return cls(arrays, h.hexdigest())

    def __eq__(self, other):
        return isinstance(other, _Heads) and self.digest == other.digest

    def __hash__(self):
        return hash(self.digest)


@dataclasses.dataclass(frozen=True)
class EarlyExit(Method):
    """DeeDiff early exit as a carried method (build it with :func:`early_exit`).

    Attributes:
      heads: the exit heads (held as constants, compared by content).
      threshold: exit after the first block whose uncertainty is below it for every
        sample of the call; 0 disables the exit (the plain call).
    """

    heads: _Heads
    threshold: float = 0.0
    name = "early_exit"

    @property
    def neutral(self) -> bool:
        return self.threshold <= 0.0

    def init(self, net, params, x, t, cond):
        if net.kind != "dit":
            raise ValueError(f"early exit is defined for a DiT (block by block); this model is a {net.kind}")
        _check_heads(self.heads.arrays, _hidden(net, params), net.depth)
        z = jnp.zeros((), jnp.int32)
        return {"calls": z, "full": z, "blocks": z, "exits": jnp.zeros((net.depth,), jnp.int32)}

    def call(self, net, params, x, t, cond, cache):
        depth = net.depth
        if self.neutral:
            out, n = net(params, x, t, cond), jnp.int32(depth)
        else:
            out, n = self._run(net, params, x, t, cond)
        return out, {
            "calls": cache["calls"] + 1,
            "full": cache["full"] + (n == depth).astype(jnp.int32),
            "blocks": cache["blocks"] + n,
            "exits": cache["exits"] + (jnp.arange(depth) == n - 1).astype(jnp.int32),
        }

    def _run(self, net, params, x, t, cond):
        """``(out, blocks computed)`` of one call with the exit."""
        heads, depth = self.heads.arrays, net.depth
        h, ctx = net.embed(params, x, t, cond)
        blocks = [lambda h, i=i: net.block(params, i, h, ctx) for i in range(depth)]

        def confident(i, h):  # after block i < depth - 1
            return jnp.max(_uncertainty(heads, i, h, ctx)) < self.threshold

        def body(s):
            i, h, _ = s
            h = jax.lax.switch(i, blocks, h)
            done = jax.lax.cond(i < depth - 1, confident, lambda i, h: jnp.bool_(False), jnp.minimum(i, depth - 2), h)
            return i + 1, h, done

        n, h, done = jax.lax.while_loop(lambda s: (s[0] < depth) & ~s[2], body, (jnp.int32(0), h, jnp.bool_(False)))
        out = jax.lax.cond(
            done,
            lambda h: net.head(params, _adapt(heads, jnp.maximum(n - 1, 0), h), ctx),
            lambda h: net.head(params, h, ctx),
            h,
        )
        return out, n

    def stats(self, cache) -> dict:
        """``calls``, ``full`` (calls that ran every block), ``blocks`` (blocks computed in
        all) and ``exits`` (``(depth,)``: calls that stopped after block ``k``; the last
        entry equals ``full``)."""
        return dict(cache)


def early_exit(heads, threshold: float) -> EarlyExit:
    """DeeDiff early exit for :func:`jdiff.accelerate.sample` (Tang et al. 2023).

    Args:
      heads: trained exit heads of the DiT being sampled (:func:`exit_heads`,
        :func:`exit_loss`, :func:`load_exit_heads`); concrete arrays.
      threshold: exit after the first block whose uncertainty ``u_i`` is below it for
        every sample of the call (``u_i`` regresses ``tanh`` of the RMS distance between
        that exit's output and the full output, in the network's output units); 0 disables
        the exit.

    Returns:
      An :class:`EarlyExit`. Sampling with it works with every solver (calls a solver
      makes inside its own ``lax.cond`` stay full calls, see
      :mod:`jdiff.accelerate._carry`) and with batched or unbatched classifier-free
      guidance (the decision is over the call's whole batch); it is not
      reverse-differentiable (the exit is a ``lax.while_loop``).

    Raises:
      ValueError: a negative or non-finite threshold; heads that do not fit the DiT (when
        sampling starts).
    """
    try:
        thr = float(threshold)
    except (TypeError, ValueError):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}") from None
    if not math.isfinite(thr) or thr < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    return EarlyExit(_Heads.of(heads), thr)


def save_exit_heads(path, heads):
    """Write exit heads to an ``.npz`` file."""
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in heads.items()})


# shipped heads: model name -> folder under jdiff/assets
SHIPPED = {"digits_dit": "digits_dit_exits"}


def load_exit_heads(path) -> dict:
    """Read exit heads written by :func:`save_exit_heads` (a dict of numpy arrays).

    Args:
      path: an ``.npz`` file, or the name of a shipped model whose heads come with jdiff
        (``"digits_dit"``: ``jdiff/assets/digits_dit_exits``, see its TRAINED.md).
    """
    if isinstance(path, str) and path in SHIPPED:
        path = importlib.resources.files("jdiff").joinpath("assets", SHIPPED[path], "heads.npz")
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
