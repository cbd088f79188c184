"""diffusers' DiTTransformer2DModel in jdiff (jdiff.interop.dit) against diffusers' own
outputs, recorded by tests/fixtures/diffusers/make_dit.py (no torch here)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32
from flax import nnx
from safetensors.numpy import load_file

from jdiff.interop import UnsupportedModelError, WeightError, Weights
from jdiff.interop.dit import DiTTransformer2D, dit_pos_embed, dit_timestep_features, from_diffusers
from jdiff.models import count_params, functional

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"


def _folder(name):
    root = FIXTURES / name / "transformer"
    config = json.loads((root / "config.json").read_text())
    return config, load_file(root / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "dit.npz"))


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in ("dit", "dit_variant"):
        config, state = _folder(name)
        model = from_diffusers(config, Weights(state, source=name))
        apply, params = functional(model)
        out[name] = (model, jax.jit(apply), params)
    return out


# Tolerance, relative to the output's scale: the network is about a dozen float32 linear
# stages in sequence (patch embedding, per block the conditioning MLP, adaLN, q/k/v, the
# attention products, the output projection and the two MLP layers, then the final layer)
# with reductions of at most 256 terms, each adding at most ~sqrt(256) = 16 roundings of
# relative size EPS32: 12 * 16 = ~200 EPS32. The timestep features are sines of t * w in
# float32, whose argument carries an absolute rounding of about t * EPS32 (torch's and
# XLA's exp may also differ by an ulp), so a timestep t adds about t * EPS32 more.
def _tolerance(ref_out, t):
    return EPS32 * np.abs(ref_out).max() * (200.0 + np.asarray(t, np.float64)[:, None])


@pytest.mark.parametrize(
    "name, suffix",
    [("dit", ""), ("dit", "_big"), ("dit_variant", "_variant")],
    ids=["trained-size", "larger-input", "variant"],
)
def test_matches_diffusers(models, ref, name, suffix):
    """Outputs equal diffusers' for fixed latents, timesteps (one fractional, 0 and 999)
    and labels (the null class among them); "larger-input" is 12x12 latents on an 8x8
    model (diffusers recomputes the position table on the stretched grid); the variant has
    an affine feed-forward norm, no attention bias, exact GELU, no learned sigma, patch 4."""
    _, apply, params = models[name]
    x = ref["x" + suffix].transpose(0, 2, 3, 1)
    t, y = ref["t" + suffix], ref["y" + suffix].astype(np.int32)
    want = ref["out" + suffix].transpose(0, 2, 3, 1)
    got = np.asarray(apply(params, x, t, y))
    assert got.shape == want.shape
    err = np.abs(got - want).reshape(len(t), -1).max(axis=1)
    tol = _tolerance(want, t)[:, 0]
    assert np.all(err <= tol), (err, tol)


def test_timestep_features(ref):
    """diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1): the
    argument t * w is rounded in float32 on both sides (and exp may differ by an ulp), an
    absolute error up to about 2 t EPS32 in each sine/cosine."""
    t = ref["t_features"]
    got = np.asarray(dit_timestep_features(t))
    err = np.abs(got - ref["features"]).max(axis=1)
    assert np.all(err <= 2 * EPS32 * (t + 1)), err
    assert np.abs(got - ref["features"])[1].max() < 4 * EPS32  # t=1 also pins the order of cos and sin


@pytest.mark.parametrize("grid", [4, 6])
def test_position_table(ref, grid):
    """The 2-D sin-cos table equals diffusers' (computed in float64, rounded once to float32)
    on the trained 4x4 grid and on a 6x6 grid interpolated onto it; the column is encoded
    first."""
    got = dit_pos_embed(16, grid, base=4)
    np.testing.assert_allclose(got, ref[f"pos{grid}"], rtol=0, atol=2 * EPS32)


def test_learned_sigma_split(models, ref):
    """DiT-XL/2's layout: out_channels = 2 * in_channels, the first in_channels are the
    prediction; without learned sigma everything is the prediction."""
    model, apply, params = models["dit"]
    assert model.prediction_channels == 4
    out = apply(params, ref["x"].transpose(0, 2, 3, 1), ref["t"], ref["y"].astype(np.int32))
    pred, rest = model.split_output(out)
    assert pred.shape == rest.shape == (3, 8, 8, 4)
    np.testing.assert_array_equal(np.asarray(pred), np.asarray(out)[..., :4])
    # no labels: the null class for every latent
    null = np.asarray(apply(params, ref["x"].transpose(0, 2, 3, 1), ref["t"], None))
    np.testing.assert_allclose(null[1], np.asarray(out)[1], rtol=0, atol=8 * EPS32 * np.abs(out).max())
    assert np.abs(null[0] - np.asarray(out)[0]).max() > 0.1  # label 3 is not the null class
    variant = models["dit_variant"][0]
    assert variant.prediction_channels == 3
    assert variant.split_output(jnp.zeros((1, 8, 8, 3)))[1] is None


def test_bfloat16_compute(ref):
    """The matrix multiplies in bfloat16 (8 significant bits: relative rounding 2^-8 per
    stage, a dozen stages) stay within 10% of the output scale of diffusers' float32 output."""
    config, state = _folder("dit")
    apply, params = functional(from_diffusers(config, Weights(state), dtype=jnp.bfloat16))
    want = ref["out"].transpose(0, 2, 3, 1)
    got = np.asarray(jax.jit(apply)(params, ref["x"].transpose(0, 2, 3, 1), ref["t"], ref["y"].astype(np.int32)))
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_random_init_has_the_checkpoint_shape():
    """The random-init constructor (built abstractly here: shapes only) holds exactly as
    many parameters as the checkpoint's state dict."""
    config, state = _folder("dit")
    model = nnx.eval_shape(lambda: DiTTransformer2D(config, rngs=nnx.Rngs(0)))
    assert count_params(model) == sum(a.size for a in state.values())


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"norm_type": "ada_norm", "_class_name": "DiTTransformer2DModel"},
            "DiT config: norm_type='ada_norm' is not supported (supported: 'ada_norm_zero')",
        ),
        (
            {"norm_type": "layer_norm"},
            "DiT config: norm_type='layer_norm' is not supported "
            "(supported: 'ada_norm_zero'; a Transformer2DModel with another one is no DiT)",
        ),
        (
            {"_class_name": "UNet2DModel"},
            "DiT config: _class_name='UNet2DModel' is not supported "
            "(supported: DiTTransformer2DModel or Transformer2DModel)",
        ),
        (
            {"activation_fn": "geglu"},
            "DiT config: activation_fn='geglu' is not supported (supported: 'gelu-approximate', 'gelu')",
        ),
    ],
)
def test_unsupported_config(change, message):
    config, state = _folder("dit")
    with pytest.raises(UnsupportedModelError) as info:
        from_diffusers({**config, **change}, Weights(state))
    assert str(info.value) == message


def test_missing_weight():
    config, state = _folder("dit")
    del state["transformer_blocks.1.attn1.to_k.weight"]
    with pytest.raises(WeightError) as info:
        from_diffusers(config, Weights(state, source="dit"))
    assert str(info.value) == (
        "dit: missing weight 'transformer_blocks.1.attn1.to_k.weight' (the config implies shape (16, 16))"
    )


def test_misshaped_weight():
    config, state = _folder("dit")
    state["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"] = np.zeros((10, 16), np.float32)
    with pytest.raises(WeightError) as info:
        from_diffusers(config, Weights(state, source="dit"))
    assert str(info.value) == (
        "dit: weight 'transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight' has shape (10, 16), "
        "the config implies (11, 16)"
    )


def test_extra_weight():
    """A weight the config does not use (here: biases a config without attention_bias
    does not have) is refused by name."""
    config, state = _folder("dit")
    with pytest.raises(
        WeightError, match=r"weight\(s\) the config does not use: 'transformer_blocks.0.attn1.to_k.bias'"
    ):
        from_diffusers({**config, "attention_bias": False}, Weights(state, source="dit"))


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.zeros((1, 8, 6, 4)), [0], "DiT expects square NHWC latents (B, H, H, 4)"),
        (np.zeros((1, 7, 7, 4)), [0], "DiT expects square NHWC latents (B, H, H, 4)"),
        (np.zeros((1, 8, 8, 4)), [11], "class labels must lie in [0, 9], or equal 10"),
    ],
)
def test_bad_inputs(models, x, y, message):
    model = models["dit"][0]
    with pytest.raises(ValueError) as info:
        model(x, np.array([1.0]), np.array(y, np.int32))
    assert message in str(info.value)
