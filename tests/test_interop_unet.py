"""jdiff's UNet2DModel equals diffusers' on committed fixtures, without torch in the suite.

``tests/fixtures/diffusers/unet/`` holds three tiny random-weight diffusers folders written
by ``make_unet.py`` (run in the reference virtualenv): ``ddpm`` (safetensors; DDPM's
CIFAR-10 options), ``cond`` (a PyTorch ``.bin``; class table, scale-shift, two layers per
block, residual-block downsampling) and ``fourier`` (safetensors; Fourier time features,
"timestep" class embedding, centred input, scaled middle block without attention,
residual-block upsampling), each with ``<name>.npz``: inputs and diffusers' outputs.

Tolerance. Both sides compute in float32 with the same (float16-representable) weights,
but sum in different orders (torch's and XLA's convolution, GEMM and GroupNorm
reductions) and use different ``exp``/``sin``/``cos``/``log`` implementations (about one
ulp each). A reduction of ``K`` products carries a rounding error of about ``sqrt(K) u``
relative to its scale (``u = 2^-24 = 6e-8``), ``K <= 9 * 24 = 216`` here: about ``1e-6``
per layer; the deepest path has about 25 such layers in series (input convolution, two
convolutions per residual block over 4 down/middle/up stages of up to 3 blocks,
attention), and GroupNorm divides by a standard deviation of order one, so errors add
roughly in quadrature to a few ``1e-6`` relative to the output's scale. We allow
``TOL = 2e-5`` times each sample's largest output magnitude (about 20 times what is
observed, 1e-6); a wrong weight mapping, a swapped sin/cos, a wrong skip order or a
float16 rounding of activations all give errors of order ``1e-3`` to ``1``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jdiff
from jdiff.features._torch_load import load_torch_state_dict
from jdiff.interop import UnsupportedModelError, WeightError, Weights
from jdiff.interop.unet2d import UNet2DModel, from_diffusers, unet2d_spec

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "unet")
TOL = 2e-5


def _folder(name):
    path = os.path.join(HERE, name)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    st = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if os.path.exists(st):
        return config, load_file(st), st
    binary = os.path.join(path, "diffusion_pytorch_model.bin")
    return config, load_torch_state_dict(binary), binary


@pytest.fixture(scope="module", params=["ddpm", "cond", "fourier"])
def case(request):
    config, state, source = _folder(request.param)
    ref = dict(np.load(os.path.join(HERE, f"{request.param}.npz")))
    model = from_diffusers(config, Weights(state, source=os.path.basename(source)))
    return request.param, config, state, model, ref


def _inputs(ref):
    return ref["x"].transpose(0, 2, 3, 1), ref["timesteps"], ref.get("labels")


def _run(model, x, t, y, **kw):
    apply, params = jdiff.models.functional(model)  # the pure view samplers use
    return np.asarray(jax.jit(apply)(params, x, t, y, **kw))


def test_matches_diffusers(case):
    name, _, _, model, ref = case
    x, t, y = _inputs(ref)
    out = _run(model, x, t, y)
    want = ref["out"].transpose(0, 2, 3, 1)
    assert out.shape == want.shape and out.dtype == np.float32
    scale = np.abs(want).max(axis=(1, 2, 3), keepdims=True)
    err = np.abs(out - want) / scale
    assert err.max() < TOL, (name, float(err.max()))
    assert np.all(scale > 1e-3), name  # not a comparison of near-zero outputs


def test_bfloat16_compute_stays_close():
    """The compute dtype reaches the convolutions and projections (bfloat16 differs from
    float32 by about its epsilon 2^-8 per layer) while normalizations stay float32."""
    config, state, _ = _folder("ddpm")
    ref = dict(np.load(os.path.join(HERE, "ddpm.npz")))
    model = from_diffusers(config, state, dtype=jnp.bfloat16)
    x, t, _ = _inputs(ref)
    out = _run(model, x.astype(jnp.bfloat16), t, None)
    want = ref["out"].transpose(0, 2, 3, 1)
    err = np.abs(out.astype(np.float32) - want).max() / np.abs(want).max()
    assert out.dtype == jnp.bfloat16 and 1e-4 < err < 0.1, err


def test_legacy_attention_names_load_the_same_weights():
    """Checkpoints saved before diffusers' Attention class name the projections query,
    key, value and proj_attn; they load to the same parameters."""
    config, state, _ = _folder("ddpm")
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for k, v in state.items():
        for new, old in renames.items():
            k = k.replace(new, old)
        legacy[k] = v
    assert legacy.keys() != state.keys()
    a = nnx.state(from_diffusers(config, state))
    b = nnx.state(from_diffusers(config, legacy))
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b), strict=True):
        assert pa == pb and np.array_equal(va.get_value(), vb.get_value())


def test_random_init_from_config():
    """The constructor builds, at random, the structure from_diffusers fills (tests, speed
    benchmarks): same graph, same parameter shapes, as many scalars as the checkpoint."""
    config, state, _ = _folder("cond")
    model = UNet2DModel(config, rngs=nnx.Rngs(0))
    loaded = from_diffusers(config, state)
    assert nnx.graphdef(model) == nnx.graphdef(loaded)
    a, b = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))
    assert [(p, v.get_value().shape) for p, v in a] == [(p, v.get_value().shape) for p, v in b]
    assert sum(v.get_value().size for _, v in a) == sum(v.size for v in state.values())
    assert all(np.all(np.isfinite(v.get_value())) for _, v in a)
    again = nnx.to_flat_state(nnx.state(UNet2DModel(config, rngs=nnx.Rngs(0))))
    assert all(np.array_equal(u.get_value(), v.get_value()) for (_, u), (_, v) in zip(a, again, strict=True))


def test_unsupported_block_type_named():
    config, state, _ = _folder("ddpm")
    bad = dict(config, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"])
    with pytest.raises(UnsupportedModelError) as e:
        from_diffusers(bad, state)
    assert str(e.value) == (
        "UNet2DModel down_block_types CrossAttnDownBlock2D not supported; supported: DownBlock2D, AttnDownBlock2D"
    )
    with pytest.raises(UnsupportedModelError, match=r"^UNet2DModel up_block_types SkipUpBlock2D not supported"):
        unet2d_spec(dict(config, up_block_types=["SkipUpBlock2D", "UpBlock2D"]))
    with pytest.raises(UnsupportedModelError) as e:
        unet2d_spec(dict(config, time_embedding_type="learned"))
    assert str(e.value) == (
        "UNet2DModel config time_embedding_type='learned' is not supported; supported: 'positional', 'fourier'"
    )
    with pytest.raises(UnsupportedModelError, match=r"^config _class_name 'UNet2DConditionModel' is not UNet2DModel$"):
        unet2d_spec(dict(config, _class_name="UNet2DConditionModel"))
    with pytest.raises(ValueError) as e:
        unet2d_spec(dict(config, block_out_channels=[8, 12, 16]))
    assert str(e.value) == (
        "UNet2DModel config has 2 down_block_types, 2 up_block_types and 3 block_out_channels; "
        "they must be equally many (at least one)"
    )


def test_missing_misshaped_and_extra_weights_named():
    config, state, _ = _folder("ddpm")
    key = "up_blocks.0.attentions.1.to_k.weight"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(WeightError) as e:
        from_diffusers(config, Weights(missing, source="model.safetensors"))
    assert str(e.value) == f"model.safetensors: missing weight {key!r} (the config implies shape (12, 12))"

    key = "down_blocks.0.resnets.0.conv1.weight"
    shaped = dict(state, **{key: np.zeros((8, 8, 3, 1), np.float16)})
    with pytest.raises(WeightError) as e:
        from_diffusers(config, Weights(shaped, source="model.safetensors"))
    assert str(e.value) == (
        f"model.safetensors: weight {key!r} has shape (8, 8, 3, 1), the config implies (8, 8, 3, 3)"
    )

    extra = dict(state, **{"mid_block.attentions.1.to_q.weight": np.zeros((12, 12), np.float16)})
    with pytest.raises(WeightError) as e:
        from_diffusers(config, Weights(extra, source="model.safetensors"))
    assert str(e.value) == (
        "model.safetensors: 1 weight(s) the config does not use: 'mid_block.attentions.1.to_q.weight'"
    )


def test_bad_inputs_are_one_line_value_errors():
    config, state, _ = _folder("cond")
    model = from_diffusers(config, state)
    x, t = jnp.zeros((2, 8, 8, 3)), jnp.array([1.0, 2.0])
    cases = [
        ((jnp.zeros((2, 7, 7, 3)), t, jnp.array([0, 1])), "with H and W divisible by 2, got (2, 7, 7, 3)"),
        ((jnp.zeros((2, 3, 8, 8)), t, jnp.array([0, 1])), "expects NHWC images (B, H, W, 3)"),
        ((x, t, None), "is class-conditional (table): pass class_labels"),
        ((x, t, jnp.array([[0, 1]])), "class_labels must have shape (2,) (table class embedding), got (1, 2)"),
        ((x, t, jnp.array([0.0, 1.0])), "class_labels must be integers below 5"),
        ((x, jnp.ones(3), jnp.array([0, 1])), "timesteps must have shape (2,)"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError) as e:
            model(*args)
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
