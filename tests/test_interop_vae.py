"""diffusers' AutoencoderKL as a jdiff module, checked against diffusers' own outputs.

The fixtures (tests/fixtures/diffusers/make_vae.py, run with torch and diffusers outside
the suite) are a tiny two-level random-weight VAE saved as safetensors (dit/vae) and as a
PyTorch .bin (vae_bin), and diffusers' encode / decode / round-trip outputs for fixed
inputs (vae_outputs.npz, NCHW).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jdiff.features._torch_load import UnsafePickleError, load_torch_state_dict
from jdiff.interop import ModelFolderError, UnsupportedModelError, WeightError, Weights, load_vae
from jdiff.interop.vae import AutoencoderKL, VAEConfig, from_diffusers

HERE = os.path.dirname(__file__)
FIX = os.path.join(HERE, "fixtures", "diffusers")
ST_DIR = os.path.join(FIX, "dit", "vae")
BIN_DIR = os.path.join(FIX, "vae_bin")
ST_FILE = os.path.join(ST_DIR, "diffusion_pytorch_model.safetensors")

# Float32 tolerance: each layer's output is a sum of at most K = 16 * 3 * 3 = 144 products
# (the widest 3x3 convolution), whose rounding errors (eps = 2^-23 each, different
# summation orders in XLA and torch) add up like a random walk, ~ sqrt(K) eps relative to
# the output's scale, and GroupNorm re-normalizes after every convolution, so per-layer
# errors add over the depth: D weighted layers between input and output (convolutions,
# linear maps; attention counted as two products). Encoder: conv_in, 2 levels x 1 ResNet
# x 2 convs, 1 downsampler, mid (2 ResNets x 2 convs + attention 2), conv_out, quant_conv
# = 14; decoder: post_quant_conv, conv_in, mid 6, 2 levels x 2 ResNets x 2 convs,
# 1 upsampler, conv_out = 18; the round trip 32.
EPS32 = float(np.finfo(np.float32).eps)
DEPTH = {"encode": 14, "decode": 18, "roundtrip": 32}


def _tol(depth: int, ref) -> float:
    return depth * np.sqrt(144) * EPS32 * max(1.0, float(np.abs(ref).max()))


def _nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


KEY = jax.random.key(3)


@functools.partial(jax.jit, static_argnums=0)
def _program(graphdef, state, x, key, z):
    """Everything the tests compare, in one compiled program per module structure (the
    weights are arguments, so a module with other weights reuses it)."""
    vae = nnx.merge(graphdef, state)
    mean, logvar = vae.encode(x)
    images = vae.decode(jnp.concatenate([z, mean]))
    return dict(mean=mean, logvar=logvar, lat=vae.to_latent(x), drawn=vae.to_latent(x, key), images=images)


def _outputs(vae, ref):
    return _program(*nnx.split(vae), _nhwc(ref["x"]), KEY, _nhwc(ref["z"]))


@pytest.fixture(scope="module")
def ref():
    return {k: np.asarray(v) for k, v in np.load(os.path.join(FIX, "vae_outputs.npz")).items()}


@pytest.fixture(scope="module")
def config():
    with open(os.path.join(ST_DIR, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def vae():
    return load_vae(ST_DIR)


@pytest.fixture(scope="module")
def out(vae, ref):
    return _outputs(vae, ref)


def test_both_folders_load_the_same_weights(vae, config):
    st = load_file(ST_FILE)
    pt = load_torch_state_dict(os.path.join(BIN_DIR, "diffusion_pytorch_model.bin"))
    assert set(st) == set(pt) and all(np.array_equal(st[k], pt[k]) for k in st)
    from_bin = load_vae(BIN_DIR)
    a, b = nnx.state(vae), nnx.state(from_bin)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    # The random-init constructor builds the same parameters (the layout the loader fills).
    rand = AutoencoderKL(config, rngs=nnx.Rngs(0))
    assert jax.tree.map(jnp.shape, nnx.state(rand)) == jax.tree.map(jnp.shape, a)
    assert sum(x.size for x in jax.tree.leaves(a)) == sum(v.size for v in st.values())
    assert vae.config == VAEConfig.from_diffusers(config) and vae.downsampling == 2


def test_encode_equals_diffusers(out, ref):
    assert out["mean"].shape == out["logvar"].shape == (2, 8, 8, 4)
    for name in ("mean", "logvar"):
        want = _nhwc(ref[name])
        np.testing.assert_allclose(out[name], want, rtol=0, atol=_tol(DEPTH["encode"], want), err_msg=name)


def test_decode_and_round_trip_equal_diffusers(out, ref):
    dec, back = out["images"][:2], out["images"][2:]
    assert dec.shape == (2, 16, 16, 3) and dec.dtype == jnp.float32
    want = _nhwc(ref["decoded"])
    np.testing.assert_allclose(dec, want, rtol=0, atol=_tol(DEPTH["decode"], want))
    want = _nhwc(ref["roundtrip"])
    np.testing.assert_allclose(back, want, rtol=0, atol=_tol(DEPTH["roundtrip"], want))


def test_to_latent_is_the_scaled_mean_or_a_scaled_sample(out):
    mean, s = out["mean"], 0.18215
    np.testing.assert_allclose(out["lat"], mean * s, rtol=1e-6, atol=1e-7)
    drawn = (mean + jnp.exp(0.5 * out["logvar"]) * jax.random.normal(KEY, mean.shape)) * s
    np.testing.assert_allclose(out["drawn"], drawn, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(out["drawn"] - out["lat"]).min()) > 0  # a sample, not the mean


@pytest.mark.parametrize("scale, shift", [(0.18215, None), (0.25, 0.5)])
def test_latent_scale_and_shift_closed_form(config, scale, shift, monkeypatch):
    # encode / decode stubbed: only the latent arithmetic runs (the networks are checked above)
    vae = AutoencoderKL(dict(config, scaling_factor=scale, shift_factor=shift), rngs=None)
    mean = np.linspace(-2, 2, 2 * 8 * 8 * 4, dtype=np.float32).reshape(2, 8, 8, 4)
    logvar = np.full_like(mean, np.log(0.25))  # std 1/2
    monkeypatch.setattr(vae, "encode", lambda x: (mean, logvar))
    monkeypatch.setattr(vae, "decode", lambda z: ("decoded", z))
    b = shift or 0.0
    np.testing.assert_allclose(vae.to_latent(None), (mean - b) * scale, rtol=1e-6)
    noise = jax.random.normal(KEY, mean.shape)
    np.testing.assert_allclose(vae.to_latent(None, KEY), (mean + 0.5 * noise - b) * scale, rtol=1e-6, atol=1e-7)
    tag, z = vae.from_latent(mean)
    assert tag == "decoded"
    np.testing.assert_allclose(z, mean / scale + b, rtol=1e-6)
    np.testing.assert_allclose(vae.from_latent(vae.to_latent(None))[1], mean, rtol=1e-6, atol=1e-6)


def test_logvar_is_clipped_as_diffusers_does(vae, ref):
    # quant_conv's logvar half biased by +/-100: logvar lands on the clip bounds 20 / -30.
    for shift, bound in ((100.0, 20.0), (-100.0, -30.0)):
        moved = nnx.clone(vae)
        moved.quant_conv.bias[...] = vae.quant_conv.bias[...].at[4:].add(shift)
        np.testing.assert_array_equal(_outputs(moved, ref)["logvar"], bound)


def test_bad_inputs_are_one_line_errors(vae):
    with pytest.raises(
        ValueError, match=r"^AutoencoderKL\.encode expects NHWC arrays \(B, H, W, 3\), got shape \(1, 3, 16, 16\)$"
    ):
        vae.encode(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(
        ValueError, match=r"^AutoencoderKL\.decode expects NHWC arrays \(B, H, W, 4\), got shape \(8, 8, 4\)$"
    ):
        vae.decode(np.zeros((8, 8, 4), np.float32))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
            "config.json: down_block_types contains 'AttnDownEncoderBlock2D', not supported "
            "(supported: 'DownEncoderBlock2D' only)",
        ),
        (
            {"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]},
            "config.json: up_block_types contains 'AttnUpDecoderBlock2D', not supported "
            "(supported: 'UpDecoderBlock2D' only)",
        ),
        (
            {"_class_name": "AutoencoderTiny"},
            "config.json: _class_name 'AutoencoderTiny' is not supported here (supported: AutoencoderKL)",
        ),
        ({"act_fn": "gelu"}, "config.json: act_fn 'gelu' is not supported (supported: 'silu', 'swish')"),
        (
            {"down_block_types": ["DownEncoderBlock2D"]},
            "config.json: down_block_types has 1 entries but block_out_channels has 2",
        ),
        ({"norm_num_groups": 3}, "config.json: norm_num_groups 3 does not divide block_out_channels entry 8"),
        (
            {"latents_mean": [0.0] * 4},
            "config.json: latents_mean is set, not supported (supported: null; per-channel latent "
            "statistics belong to the pipeline, not the VAE)",
        ),
    ],
)
def test_unsupported_config_is_one_line_error(config, change, message):
    with pytest.raises(UnsupportedModelError) as e:
        from_diffusers(dict(config, **change), Weights({}))
    assert str(e.value) == message


def test_weight_errors_name_key_and_shapes(config):
    state = load_file(ST_FILE)
    src = "vae.safetensors"
    key = "decoder.mid_block.attentions.0.to_k.weight"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(WeightError) as e:
        from_diffusers(config, Weights(missing, source=src))
    assert str(e.value) == f"{src}: missing weight {key!r} (the config implies shape (16, 16))"
    key = "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    bad = dict(state, **{key: np.zeros((16, 8, 3, 3), np.float32)})
    with pytest.raises(WeightError) as e:
        from_diffusers(config, Weights(bad, source=src))
    assert str(e.value) == f"{src}: weight {key!r} has shape (16, 8, 3, 3), the config implies (16, 8, 1, 1)"
    extra = dict(state, **{"encoder.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightError) as e:
        from_diffusers(config, Weights(extra, source=src))
    assert str(e.value) == f"{src}: 1 weight(s) the config does not use: 'encoder.extra.weight'"
    # The config decides the shapes: without mid-block attention its weights are extra.
    with pytest.raises(WeightError, match=r"20 weight\(s\) the config does not use: 'decoder\.mid_block\.attentions"):
        from_diffusers(dict(config, mid_block_add_attention=False), Weights(state, source=src))


def test_pre_0_15_attention_names_load(config, out, ref):
    # Checkpoints saved before diffusers 0.15 (as sd-vae-ft-ema/mse were) name the mid
    # block's attention query/key/value/proj_attn; they load to the same module.
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in load_file(ST_FILE).items():
        for new, legacy in names.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    legacy_vae = from_diffusers(config, Weights(old))
    np.testing.assert_array_equal(_outputs(legacy_vae, ref)["images"], out["images"])


def _os_system_pickle() -> bytes:
    # protocol 2: GLOBAL 'os system', the argument tuple, REDUCE: os.system("touch JDIFF_PWNED")
    cmd = b"touch JDIFF_PWNED"
    return b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."


@pytest.mark.parametrize("payload", ["builtins.exec", "os.system"])
def test_malicious_bin_folder_is_refused_before_anything_runs(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # each payload would create ./JDIFF_PWNED
    folder = tmp_path / "vae"
    folder.mkdir()
    shutil.copy(os.path.join(BIN_DIR, "config.json"), folder / "config.json")
    weights = folder / "diffusion_pytorch_model.bin"
    if payload == "builtins.exec":
        shutil.copy(os.path.join(HERE, "fixtures", "malicious", "malicious_zip.pth"), weights)
        with zipfile.ZipFile(weights) as zf:
            raw = zf.read("archive/data.pkl")
    else:
        raw = _os_system_pickle()
        with zipfile.ZipFile(weights, "w") as zf:
            zf.writestr("archive/data.pkl", raw)
    with pytest.raises(UnsafePickleError, match=rf"diffusion_pytorch_model\.bin.*refusing to load global {payload}"):
        load_vae(folder)
    assert not (tmp_path / "JDIFF_PWNED").exists()
    pickle.loads(raw)  # control: a plain unpickler does run it (the file really is hostile)
    assert (tmp_path / "JDIFF_PWNED").exists()


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(ModelFolderError, match=r"no config\.json; expected"):
        load_vae(tmp_path)
    shutil.copy(os.path.join(ST_DIR, "config.json"), tmp_path / "config.json")
    with pytest.raises(ModelFolderError, match=r"no weights \(diffusion_pytorch_model\.safetensors or \.bin\)"):
        load_vae(tmp_path)
