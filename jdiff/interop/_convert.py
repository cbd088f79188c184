"""Reading a diffusers (PyTorch-layout) state dict into jdiff modules, one key at a time.

:class:`Weights` hands out each tensor once, converted to flax's layout, after checking
its shape against what the config implies; :meth:`Weights.finish` refuses any key that
no module took. Every failure names the key and both shapes in one line.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["UnsupportedModelError", "WeightError", "Weights"]


class WeightError(ValueError):
    """A weight is missing, left over, or has a shape the config does not imply."""


class UnsupportedModelError(ValueError):
    """A folder's model class or config value that jdiff does not support."""


def _shape(s) -> str:
    return "(" + ", ".join(str(int(d)) for d in s) + ")"


class Weights:
    """A state dict ``{key: array}`` in PyTorch layout, consumed by module builders.

    Arguments:
      state: the tensors (NumPy arrays, as :func:`jdiff.features.load_state_dict` or
        ``safetensors.numpy.load_file`` return them).
      source: what to name in errors (the weights file).
      dtype: the dtype every tensor is cast to when taken (None keeps the file's).
    """

    def __init__(self, state: Mapping[str, np.ndarray], source: str = "the weights", dtype=np.float32):
        self._state = dict(state)
        self._taken: set[str] = set()
        self.source = source
        self.dtype = dtype

    def __contains__(self, key: str) -> bool:
        return key in self._state

    def take(self, key: str, shape) -> np.ndarray:
        """The tensor ``key`` in its PyTorch layout, checked to have ``shape``."""
        if key not in self._state:
            raise WeightError(f"{self.source}: missing weight {key!r} (the config implies shape {_shape(shape)})")
        if key in self._taken:
            raise WeightError(f"{self.source}: weight {key!r} taken twice")
        a = np.asarray(self._state[key])
        if tuple(a.shape) != tuple(shape):
            raise WeightError(
                f"{self.source}: weight {key!r} has shape {_shape(a.shape)}, the config implies {_shape(shape)}"
            )
        self._taken.add(key)
        return a.astype(self.dtype) if self.dtype is not None else a

    def linear(self, prefix: str, d_in: int, d_out: int, bias: bool = True):
        """``(kernel (d_in, d_out), bias (d_out,) or None)`` of ``torch.nn.Linear`` ``prefix``."""
        w = self.take(f"{prefix}.weight", (d_out, d_in)).T
        b = self.take(f"{prefix}.bias", (d_out,)) if bias else None
        return np.ascontiguousarray(w), b

    def conv(self, prefix: str, c_in: int, c_out: int, k: int, bias: bool = True):
        """``(kernel (k, k, c_in, c_out) HWIO, bias)`` of ``torch.nn.Conv2d`` ``prefix``."""
        w = self.take(f"{prefix}.weight", (c_out, c_in, k, k)).transpose(2, 3, 1, 0)
        b = self.take(f"{prefix}.bias", (c_out,)) if bias else None
        return np.ascontiguousarray(w), b

    def norm(self, prefix: str, c: int):
        """``(scale, bias)`` of a ``GroupNorm`` / ``LayerNorm`` ``prefix`` with ``c`` channels."""
        return self.take(f"{prefix}.weight", (c,)), self.take(f"{prefix}.bias", (c,))

    def finish(self) -> None:
        """Raise :class:`WeightError` naming the keys no module took (an extra weight)."""
        left = sorted(set(self._state) - self._taken)
        if left:
            more = f" and {len(left) - 3} more" if len(left) > 3 else ""
            raise WeightError(
                f"{self.source}: {len(left)} weight(s) the config does not use: "
                + ", ".join(repr(k) for k in left[:3])
                + more
            )
