"""Low-rank adapters (LoRA) on the Dense and Conv layers of the jdiff models, and
partial fine-tuning with optax.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022)
adds to a frozen kernel ``W`` a low-rank update ``scale * A B``: for a Dense layer
``W`` is ``(in, out)``, ``A`` is ``(in, r)`` and ``B`` is ``(r, out)``; for a
convolution ``W`` is ``(kh, kw, in, out)`` and ``A B`` (``A`` of shape ``(kh kw in, r)``)
is reshaped to it, i.e. a ``kh x kw`` convolution to ``r`` channels followed by a 1x1
convolution back to ``out`` (LoCon's factorization). ``B`` starts at zero, so a fresh
adapter leaves the model exactly unchanged. Adapters are a plain pytree
``{"path/to/kernel": {"a": A, "b": B}}`` (paths as in :func:`jdiff.flatten_params`),
trained as the parameters while the base model travels as frozen parameters, and
:func:`lora_merge` folds them back into plain parameters for sampling.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jdiff.models._conv import conv_general_dilated
from jdiff.runs._pretrained import _path_names, flatten_params

__all__ = ["lora_targets", "lora_init", "lora_merge", "lora_model", "partial_optimizer", "param_labels"]


def lora_targets(params, include: Callable[[str], bool] | None = None) -> dict:
    """``{path: kernel shape}`` of the Dense (2-D) and Conv (4-D) kernels of ``params``
    (an ``nnx.State`` or any pytree), optionally filtered by ``include(path)``."""
    out = {}
    for path, w in flatten_params(params).items():
        if path.split("/")[-1] == "kernel" and getattr(w, "ndim", 0) in (2, 4):
            if include is None or include(path):
                out[path] = tuple(w.shape)
    return out


def lora_init(params, rank: int, key, *, include: Callable[[str], bool] | None = None) -> dict:
    """Fresh adapters of rank ``rank`` for the kernels :func:`lora_targets` selects.

    ``A`` is drawn ``N(0, 1 / fan_in)`` and ``B`` is zero (so :func:`lora_merge` returns
    the base parameters exactly); the rank is capped by the kernel's dimensions.

    Raises:
      ValueError: a rank below 1, or no kernel selected.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    targets = lora_targets(params, include)
    if not targets:
        raise ValueError("no Dense or Conv kernel selected for LoRA")
    dims = tuple(
        (path, math.prod(shape[:-1]), shape[-1], min(rank, math.prod(shape[:-1]), shape[-1]))
        for path, shape in sorted(targets.items())
    )
    return _draw_lora(key, dims)


@functools.partial(jax.jit, static_argnums=1)
def _draw_lora(key, dims):
    """All adapters from one normal draw (``dims``: ``(path, fan_in, out, rank)`` per
    kernel): one random-bits program whatever the number of layers."""
    sizes = [fan_in * r for _, fan_in, _, r in dims]
    z = jax.random.normal(key, (sum(sizes),), jnp.float32)
    lora, start = {}, 0
    for (path, fan_in, out, r), n in zip(dims, sizes, strict=True):
        a = z[start : start + n].reshape(fan_in, r) / math.sqrt(fan_in)
        lora[path] = {"a": a, "b": jnp.zeros((r, out), jnp.float32)}
        start += n
    return lora


def _check_lora(params, lora):
    targets = lora_targets(params)
    unknown = sorted(set(lora) - set(targets))
    if unknown:
        raise ValueError(f"LoRA adapters for kernels the model does not have: {unknown[:5]}")
    for path, ab in lora.items():
        shape = targets[path]
        a, b = ab["a"], ab["b"]
        if a.shape[0] != math.prod(shape[:-1]) or b.shape[-1] != shape[-1] or a.shape[1] != b.shape[0]:
            raise ValueError(f"LoRA adapter {path}: A {a.shape} B {b.shape} do not fit the kernel {shape}")


def lora_merge(params, lora: dict, scale: float = 1.0):
    """The base ``params`` with every adapted kernel replaced by ``W + scale * A B``
    (reshaped to ``W``'s shape); the same pytree type as ``params``, ready for a
    :class:`jdiff.Denoiser`. Differentiable in both arguments.

    Raises:
      ValueError: adapters for kernels the model does not have, or of the wrong shapes."""
    _check_lora(params, lora)

    def merge(path, w):
        ab = lora.get(_path_names(path))
        if ab is None:
            return w
        delta = (ab["a"] @ ab["b"]).reshape(w.shape)
        return (w + scale * delta.astype(w.dtype)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(merge, params)


class _LoRALinear(nnx.Module):
    def __init__(self, base: nnx.Linear, a, b, scale):
        self.base, self.a, self.b, self.scale = base, nnx.Param(a), nnx.Param(b), scale

    def __call__(self, x):
        return self.base(x) + self.scale * ((x @ self.a[...]) @ self.b[...]).astype(x.dtype)


class _LoRAConv(nnx.Module):
    def __init__(self, base: nnx.Conv, a, b, scale):
        self.base, self.a, self.b, self.scale = base, nnx.Param(a), nnx.Param(b), scale

    def __call__(self, x):
        base = self.base
        kh, kw = base.kernel_size
        strides = base.strides if isinstance(base.strides, (tuple, list)) else (base.strides,) * 2
        down = conv_general_dilated(  # fast gradients inside lax.scan on CPU, like the U-Net's
            x,
            self.a[...].reshape(kh, kw, base.in_features, -1).astype(x.dtype),
            window_strides=tuple(strides),
            padding=base.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return base(x) + self.scale * (down @ self.b[...].astype(x.dtype))


def lora_model(model: nnx.Module, lora: dict, scale: float = 1.0) -> nnx.Module:
    """A copy of ``model`` whose adapted Dense / Conv layers compute ``base(x) + scale *
    lora(x)`` *un-merged* (the low-rank path as its own matmul / convolution): the
    reference forward that :func:`lora_merge` must reproduce.

    Raises:
      ValueError: adapters that do not fit the model; a grouped or dilated convolution."""
    graphdef, state = nnx.split(model)
    _check_lora(state, lora)
    m = nnx.merge(graphdef, state, copy=True)
    for path, mod in list(nnx.iter_modules(m)):
        key = "/".join(str(p) for p in path) + "/kernel"
        if key not in lora or not path:
            continue
        ab = lora[key]
        if isinstance(mod, nnx.Conv):
            if mod.feature_group_count != 1 or any(d != 1 for d in jnp.atleast_1d(mod.kernel_dilation or 1)):
                raise ValueError(f"{key}: LoRA on grouped or dilated convolutions is not supported")
            new = _LoRAConv(mod, ab["a"], ab["b"], scale)
        elif isinstance(mod, nnx.Linear):
            new = _LoRALinear(mod, ab["a"], ab["b"], scale)
        else:
            continue
        parent = m
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return m


def param_labels(params, trainable: Callable[[str], bool]):
    """The pytree of ``params`` with ``"train"`` where ``trainable(path)`` and ``"frozen"``
    elsewhere (paths as in :func:`jdiff.flatten_params`)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "train" if trainable(_path_names(p)) else "frozen", params)


def partial_optimizer(tx: optax.GradientTransformation, params, trainable: Callable[[str], bool]):
    """Train only the parameter groups ``trainable(path)`` selects: ``optax.multi_transform``
    of ``tx`` on them and ``optax.set_to_zero()`` on the rest, whose values then never
    change (no update, no weight decay) and which hold no optimizer state.

    Raises:
      ValueError: ``trainable`` selects no parameter."""
    labels = param_labels(params, trainable)
    if "train" not in jax.tree.leaves(labels):
        raise ValueError("partial_optimizer: trainable() selects no parameter")
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
