"""The digits DiT and the small digits U-Net shipped with jdiff (issue 25's models for
caching and model stitching): ``jdiff.presets.pretrained("digits_dit")`` and
``pretrained("digits_small")``.

- both load from their folders, as the networks their presets name, and each folder's
  config.json is its preset's configuration (``jdiff train NAME`` retrains it);
- one small batch through each network (one compile per model): the output has the
  image's shape, is finite, and depends on the label; the null class (index 10, the
  unconditional branch of classifier-free guidance) is accepted and gives a prediction
  different from every label's;
- the small U-Net can stand in for the digits U-Net (same process, prediction, time
  input, data shape and classes) at under a third of its FLOPs per call (XLA's cost
  analysis of the lowered call).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import presets
from jdiff.runs import config_to_dict, get_preset

B = 11  # labels 0..9 and the null class 10


def _flops(lowered) -> float:
    cost = lowered.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.fixture(scope="module")
def calls():
    """{name: (denoiser, config, output on the small batch or None, FLOPs of the call)}.
    FLOPs from the lowered (uncompiled) call: compiling the digits U-Net only to count
    its FLOPs would double the cost of this file."""
    x = jax.random.normal(jax.random.key(0), (B, 8, 8, 1), jnp.float32)
    t = jnp.full((B,), 0.6, jnp.float32)
    labels = jnp.arange(B, dtype=jnp.int32)
    out = {}
    for name in ("digits", "digits_small", "digits_dit"):
        den, cfg = presets.pretrained(name)
        lowered = jax.jit(den.apply_fn).lower(den.params, x, t, labels)
        y = None if name == "digits" else np.asarray(lowered.compile()(den.params, x, t, labels))
        out[name] = (den, cfg, y, _flops(lowered))
    return out


@pytest.mark.parametrize("name,kind", [("digits_dit", "dit"), ("digits_small", "unet")])
def test_loads_and_predicts(calls, name, kind):
    den, cfg, y, _ = calls[name]
    assert cfg.name == name and cfg.model.kind == kind
    with open(os.path.join(presets.pretrained_dir(name), "config.json")) as f:
        assert json.load(f) == config_to_dict(get_preset(name))
    assert cfg.data.shape == (8, 8, 1) and cfg.model.network.num_classes == 10
    assert y.shape == (B, 8, 8, 1) and np.all(np.isfinite(y))
    # the label matters (a trained conditional model): every pair of rows differs,
    # the null class's row included
    flat = y.reshape(B, -1)
    dist = np.abs(flat[:, None] - flat[None]).max(-1)
    assert np.all(dist[~np.eye(B, dtype=bool)] > 1e-3)


def test_small_stands_in_for_digits(calls):
    big, big_cfg, _, big_flops = calls["digits"]
    small, small_cfg, _, small_flops = calls["digits_small"]
    assert (small.prediction, small.time_input) == (big.prediction, big.time_input)
    assert small.process == big.process
    assert small_cfg.data == big_cfg.data and small_cfg.objective == big_cfg.objective
    assert 0 < small_flops < big_flops / 3, (small_flops, big_flops)
