"""Deterministic pseudo-random weights for a conv/batch-norm/linear state dict.

NumPy only (no jax, no torch): the fixture script runs this file in a torch-only virtual
environment (loading it by path) and the tests run it in jdiff, and both get the same
numbers, so the layer-by-layer fixture needs no stored weights. Each tensor's values come
from its own generator seeded by ``(seed, crc32(name))``, so they do not depend on the
order of the names.

Scales keep activations of order one through a deep ReLU network: convolution and linear
weights are He-normal (``std = sqrt(2 / fan_in)``, which preserves the second moment
through conv + ReLU), batch-norm scales and running variances lie in ``[0.5, 1.5]``
(positive), biases and running means are ``N(0, 0.1^2)``.
"""

from __future__ import annotations

import zlib

import numpy as np


def random_state_dict(shapes, seed: int) -> dict:
    """``{name: float32 array}`` for ``{name: shape}`` in PyTorch's layout.

    The role of a tensor is read from its name: ``*.weight`` of rank >= 2 is a conv or
    linear weight (fan-in = product of all but the first axis); ``bn.weight``/``bn.bias``/
    ``running_mean``/``running_var`` are batch-norm tensors; any other ``*.bias`` is a
    linear bias.
    """
    out = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])
        if name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("running_mean") or name.endswith(".bias"):
            value = 0.1 * rng.standard_normal(shape)
        elif name.endswith(".weight"):
            fan_in = int(np.prod(shape[1:]))
            value = np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)
        else:
            raise ValueError(f"cannot tell the role of tensor {name!r}")
        out[name] = value.astype(np.float32)
    return out
