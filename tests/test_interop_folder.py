"""Reading diffusers-format folders (jdiff.interop.load_diffusers) on tiny stand-in
architectures, the layout errors, the hub-less message and ``jdiff sample --model``.

The stand-ins are registered under the real class names (``UNet2DModel``,
``DiTTransformer2DModel``, ``AutoencoderKL``) for these tests only, so the loader's own
work is tested here: finding the files, reading weights (safetensors, a torch-free
``.bin``, fp16 variants), the scheduler, classes and null class, the learned-sigma
split, guidance, thresholding and the VAE; the real architectures are tested against
diffusers in their own test files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from PIL import Image

import jdiff
from jdiff import cli
from jdiff.features import UnsafePickleError
from jdiff.interop import (
    ARCHITECTURES,
    ModelFolderError,
    UnsupportedModelError,
    WeightError,
    load_diffusers,
    sample_model,
)
from jdiff.interop._folder import LAYOUT

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SCHEDULERS = os.path.join(FIXTURES, "diffusers", "schedulers")


class TinyNet(nnx.Module):
    """``x W + b + timestep * s (+ table[label])`` per pixel: a denoiser stand-in read
    from a diffusers-style state dict (a 1x1 ``conv_in``, ``time_scale``, an optional
    ``class_embedding`` table of ``n`` rows, ``n + 1`` for a DiT's null class)."""

    def __init__(self, config, weights):
        c, o = config["in_channels"], config.get("out_channels") or config["in_channels"]
        k, b = weights.conv("conv_in", c, o, 1)
        self.kernel, self.bias = nnx.Param(jnp.asarray(k[0, 0])), nnx.Param(jnp.asarray(b))
        self.time_scale = nnx.Param(jnp.asarray(weights.take("time_scale", (o,))))
        n = config.get("num_class_embeds") or config.get("num_embeds_ada_norm")
        rows = (n + 1) if config.get("num_embeds_ada_norm") else n
        self.table = nnx.Param(jnp.asarray(weights.take("class_embedding.weight", (rows, o)))) if n else None
        weights.finish()

    def __call__(self, x, timesteps, class_labels=None):
        out = x @ self.kernel[...] + self.bias[...] + timesteps[:, None, None, None] * self.time_scale[...]
        if class_labels is not None:
            out = out + self.table[...][class_labels][:, None, None, :]
        return out


class TinyVAE(nnx.Module):
    """``to_latent``: 2x2 average pool of ``x P``, times the scaling factor;
    ``from_latent``: the inverse projection of ``z / scale``, repeated 2x2."""

    def __init__(self, config, weights):
        lc, self.scale = config["latent_channels"], config.get("scaling_factor", 0.18215)
        self.P = nnx.Param(jnp.asarray(weights.take("proj", (3, lc))))
        self.U = nnx.Param(jnp.asarray(weights.take("unproj", (lc, 3))))
        weights.finish()

    def to_latent(self, images, key=None):
        y = images @ self.P[...]
        b, h, w, c = y.shape
        return y.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)) * self.scale

    def from_latent(self, z):
        x = (z / self.scale) @ self.U[...]
        return x.repeat(2, axis=1).repeat(2, axis=2)


@pytest.fixture(autouse=True)
def stand_ins(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "UNet2DModel", TinyNet)
    monkeypatch.setitem(ARCHITECTURES, "DiTTransformer2DModel", TinyNet)
    monkeypatch.setitem(ARCHITECTURES, "AutoencoderKL", TinyVAE)


# one compiled program per denoiser structure instead of one per eager operation
_call = jax.jit(lambda den, x, t, c=None: den(x, t, c))
_raw = jax.jit(lambda den, x, t, c=None: den.raw(x, t, c))


def _write(folder, config=None, state=None, scheduler=None, name="diffusion_pytorch_model.safetensors"):
    os.makedirs(folder, exist_ok=True)
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
    if state is not None:
        safetensors.numpy.save_file(state, os.path.join(folder, name))
    if scheduler is not None:
        shutil.copy(os.path.join(SCHEDULERS, scheduler, "scheduler_config.json"), folder)
    return str(folder)


def _net_state(c, o, n=0, seed=0, dtype=np.float32):
    r = np.random.default_rng(seed)
    s = {
        "conv_in.weight": r.normal(size=(o, c, 1, 1)),
        "conv_in.bias": r.normal(size=(o,)),
        "time_scale": r.normal(size=(o,)) * 1e-3,
    }
    if n:
        s["class_embedding.weight"] = r.normal(size=(n, o))
    return {k: v.astype(dtype) for k, v in s.items()}


def _expected(state, x, timesteps, labels=None):
    out = (
        x @ state["conv_in.weight"][:, :, 0, 0].T
        + state["conv_in.bias"]
        + timesteps[:, None, None, None] * (state["time_scale"])
    )
    if labels is not None:
        out = out + state["class_embedding.weight"][labels][:, None, None, :]
    return out


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """A DDPMPipeline folder like google/ddpm-cifar10-32 (8x8, 3 channels)."""
    root = tmp_path_factory.mktemp("ddpm")
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "x"]}
    (root / "model_index.json").write_text(json.dumps(index))
    cfg = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 3, "out_channels": 3}
    state = _net_state(3, 3)
    _write(root / "unet", cfg, state)
    os.makedirs(root / "scheduler")
    _write(root / "scheduler", scheduler="ddpm_linear")
    return str(root), state


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A DiTPipeline folder like facebook/DiT-XL-2-256: the transformer under its old
    class name Transformer2DModel (norm_type ada_norm_zero), learned sigma (2C outputs),
    4 classes and the null class, a VAE with 2 latent channels (8x8 images, 4x4 latents)."""
    root = tmp_path_factory.mktemp("dit")
    index = {
        "_class_name": "DiTPipeline",
        "transformer": ["diffusers", "Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    cfg = {
        "_class_name": "Transformer2DModel",
        "norm_type": "ada_norm_zero",
        "sample_size": 4,
        "in_channels": 2,
        "out_channels": 4,
        "num_embeds_ada_norm": 4,
    }
    state = _net_state(2, 4, n=5, seed=1)
    _write(root / "transformer", cfg, state)
    r = np.random.default_rng(2)
    vae = {"proj": r.normal(size=(3, 2)).astype(np.float32), "unproj": r.normal(size=(2, 3)).astype(np.float32)}
    _write(root / "vae", {"_class_name": "AutoencoderKL", "latent_channels": 2, "scaling_factor": 0.5}, vae)
    sched = {"_class_name": "DDIMScheduler", "clip_sample": False, "set_alpha_to_one": True}
    os.makedirs(root / "scheduler")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    return str(root), state, vae


def test_pipeline_folder(ddpm_folder):
    path, state = ddpm_folder
    m = load_diffusers(path)
    assert m.shape == (8, 8, 3) and m.num_classes == 0 and m.null_class is None and m.vae is None
    assert m.class_name == "UNet2DModel" and m.pipeline == "DDPMPipeline" and m.default_steps == 1000
    assert m.scheduler.class_name == "DDPMScheduler" and m.default_solver == "ddpm"
    den = m.denoiser
    assert isinstance(den, jdiff.Denoiser) and den.prediction == "eps" and den.time_input == "timestep"
    np.testing.assert_array_equal(m.grid(10), m.scheduler.grid(10))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    t = jnp.asarray([0.5, 0.802], jnp.float32)
    np.testing.assert_allclose(_raw(den, x, t), _expected(state, x, np.asarray(1000 * t - 1)), rtol=1e-5, atol=1e-5)
    # params is an explicit pytree: a gradient reaches the weights
    g = jax.grad(lambda p: jnp.sum(den.replace(params=p).raw(x, t)))(den.params)
    assert sum(float(jnp.abs(v).sum()) for v in jax.tree.leaves(g)) > 0
    # DDPM clips x0 to [-1, 1] by default: the sampling denoiser does, the bare one does not
    assert float(jnp.abs(_call(den, x * 50, t).x0).max()) > 1.0
    assert float(jnp.abs(_call(m.sampling_denoiser(), x * 50, t).x0).max()) <= 1.0
    np.testing.assert_array_equal(m.decode(x), x)
    with pytest.raises(ValueError, match="UNet2DModel has no null class: classifier-free guidance needs"):
        m.sampling_denoiser(2.0)


def test_dit_pipeline_with_vae(dit_folder):
    path, state, vae = dit_folder
    m = load_diffusers(path)
    assert m.class_name == "DiTTransformer2DModel" and m.shape == (4, 4, 2)
    assert m.num_classes == 4 and m.null_class == 4 and m.default_steps == 50
    assert m.scheduler.thresholding is None and m.scheduler.final == "data"
    x = np.random.default_rng(3).normal(size=(3, 4, 4, 2)).astype(np.float32)
    labels = np.array([0, 3, 1], np.int32)
    t = jnp.float32(0.3)
    full = _expected(state, x, np.full(3, 299.0), labels)
    np.testing.assert_allclose(_raw(m.denoiser, x, t, labels), full[..., :2], rtol=1e-5, atol=1e-5)  # sigma split off
    with pytest.raises(ValueError, match="class-conditional: pass cond= class labels"):
        _raw(m.denoiser, x, t)
    # classifier-free guidance against the null class (label 4), on eps
    w = 3.0
    null = _expected(state, x, np.full(3, 299.0), np.full(3, 4))[..., :2]
    eps = null + w * (full[..., :2] - null)
    np.testing.assert_allclose(_call(m.sampling_denoiser(w), x, t, labels).eps, eps, rtol=1e-4, atol=1e-4)
    # the VAE: latents of 4x4x2 <-> images of 8x8x3, with its scaling factor
    z = np.asarray(m.decode(x))
    np.testing.assert_allclose(z, ((x / 0.5) @ vae["unproj"]).repeat(2, 1).repeat(2, 2), rtol=1e-5, atol=1e-5)
    assert m.encode(z).shape == (3, 4, 4, 2)
    # jdiff's grids on the same process, ending where the scheduler ends (the data)
    sol = jdiff.solvers.get("dpm++2m")
    np.testing.assert_array_equal(
        m.grid(6, sol, kind="logsnr"), jdiff.time_grid(m.process, nfe=6, solver=sol, kind="logsnr", final="data")
    )
    # every jdiff solver works on it unchanged
    sol = jdiff.solvers.get("dpm++2m")
    out = jdiff.sample(sol, m.sampling_denoiser(2.0), jnp.ones((3, 4, 4, 2)), m.grid(4, sol), cond=labels)
    assert np.all(np.isfinite(np.asarray(out)))


def test_model_folder_bin_fp16_and_malicious(tmp_path, monkeypatch):
    cfg = {"_class_name": "UNet2DModel", "sample_size": [4, 6], "in_channels": 3}
    # a torch-free .bin (the zip format; tiny state dict of tests/fixtures), scheduler in scheduler/
    folder = _write(tmp_path / "bin", cfg)
    shutil.copy(os.path.join(FIXTURES, "torch_tiny_zip.pth"), os.path.join(folder, "diffusion_pytorch_model.bin"))
    _write(tmp_path / "bin" / "scheduler", scheduler="ddim_scaled_leading")
    seen = {}

    def from_bin(config, weights):
        seen["bias"] = weights.take("bias", (3,))
        return TinyNet({"in_channels": 3}, _as_weights(_net_state(3, 3)))

    monkeypatch.setitem(ARCHITECTURES, "UNet2DModel", from_bin)
    m = load_diffusers(folder)
    assert m.shape == (4, 6, 3) and m.scheduler.class_name == "DDIMScheduler" and m.pipeline is None
    assert seen["bias"].dtype == np.float32 and seen["bias"].shape == (3,)
    # a pickle that would run code is refused before the architecture is built
    seen.clear()
    evil = _write(tmp_path / "evil", cfg, scheduler="ddpm_linear")
    shutil.copy(
        os.path.join(FIXTURES, "malicious", "malicious_zip.pth"), os.path.join(evil, "diffusion_pytorch_model.bin")
    )
    with pytest.raises(UnsafePickleError) as e:
        load_diffusers(evil)
    assert "\n" not in str(e.value) and "diffusion_pytorch_model.bin" in str(e.value) and not seen
    # only an fp16 variant: read, cast to the dtype asked for
    monkeypatch.setitem(ARCHITECTURES, "UNet2DModel", TinyNet)
    state = _net_state(3, 3, dtype=np.float16)
    fp16 = _write(tmp_path / "fp16", cfg, state, "ddpm_linear", name="diffusion_pytorch_model.fp16.safetensors")
    m = load_diffusers(fp16)
    assert {str(a.dtype) for a in jax.tree.leaves(m.denoiser.params)} == {"float32"}
    m = load_diffusers(fp16, dtype=jnp.bfloat16)
    assert {str(a.dtype) for a in jax.tree.leaves(m.denoiser.params)} == {"bfloat16"}


def _as_weights(state):
    return jdiff.interop.Weights(state, source="test")


def test_layout_errors_are_one_line(tmp_path, ddpm_folder):
    def message(path, exc=ModelFolderError):
        with pytest.raises(exc) as e:
            load_diffusers(str(path))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert message("/nonexistent/jdiff/model") == f"/nonexistent/jdiff/model: no such folder; expected {LAYOUT}"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert message(empty) == f"{empty}: neither model_index.json nor config.json; expected {LAYOUT}"
    cfg = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 3}
    no_w = _write(tmp_path / "no_weights", cfg, scheduler="ddpm_linear")
    assert message(no_w) == (f"{no_w}: no weights (diffusion_pytorch_model.safetensors or .bin); expected {LAYOUT}")
    no_s = _write(tmp_path / "no_scheduler", cfg, _net_state(3, 3))
    assert message(no_s) == f"{no_s}: no scheduler_config.json; expected {LAYOUT}"
    other = _write(tmp_path / "cond", {**cfg, "_class_name": "UNet2DConditionModel"}, _net_state(3, 3), "ddpm_linear")
    assert message(other, UnsupportedModelError) == (
        f"{other}/config.json: model class 'UNet2DConditionModel' is not supported; supported: UNet2DModel, "
        "DiTTransformer2DModel, AutoencoderKL"
    )
    vae = _write(tmp_path / "vae", {"_class_name": "AutoencoderKL", "latent_channels": 2}, scheduler="ddpm_linear")
    safetensors.numpy.save_file(
        {"proj": np.zeros((3, 2), np.float32), "unproj": np.zeros((2, 3), np.float32)},
        os.path.join(vae, "diffusion_pytorch_model.safetensors"),
    )
    assert message(vae, UnsupportedModelError) == (
        f"{vae}/config.json: AutoencoderKL is not a denoiser; supported: UNet2DModel, DiTTransformer2DModel "
        "(a VAE is read from a pipeline's vae/ folder)"
    )
    garbage = _write(tmp_path / "garbage", cfg, scheduler="ddpm_linear")
    with open(os.path.join(garbage, "diffusion_pytorch_model.safetensors"), "wb") as f:
        f.write(b"not safetensors")
    assert message(garbage, ValueError).startswith(
        f"{garbage}/diffusion_pytorch_model.safetensors: not a readable safetensors file ("
    )
    # a mis-shaped weight names the key and both shapes (jdiff.interop.Weights)
    bad = _write(tmp_path / "bad", cfg, {**_net_state(3, 3), "time_scale": np.zeros(4, np.float32)}, "ddpm_linear")
    assert message(bad, WeightError).endswith(
        "bad/diffusion_pytorch_model.safetensors: weight 'time_scale' has shape (4), the config implies (3)"
    )
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "AudioPipeline", "mel": ["x", "Mel"]}))
    assert message(pipe, UnsupportedModelError) == (
        f"{pipe}/model_index.json: pipeline 'AudioPipeline' has no unet or transformer (it has: mel); "
        "supported: a pipeline whose denoiser is a UNet2DModel or DiTTransformer2DModel"
    )


def test_model_id_without_and_with_huggingface_hub(monkeypatch, ddpm_folder):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails: not installed
    with pytest.raises(ModelFolderError) as e:
        load_diffusers("google/ddpm-cifar10-32")
    assert str(e.value) == (
        "google/ddpm-cifar10-32 is not a local folder, and downloading a model id needs huggingface_hub "
        f"(not installed); pass {LAYOUT}"
    )
    calls = []

    def list_files(repo_id):
        if repo_id == "owner/offline":
            raise OSError("no network")
        return ["model_index.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors"]

    def download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return ddpm_folder[0]

    hub = types.SimpleNamespace(snapshot_download=download, list_repo_files=list_files)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    assert load_diffusers("google/ddpm-cifar10-32").shape == (8, 8, 3)
    patterns = ["*.json", "*diffusion_pytorch_model.safetensors", "*diffusion_pytorch_model-*.safetensors"]
    assert calls == [("google/ddpm-cifar10-32", patterns)]
    with pytest.raises(ModelFolderError, match=r"could not download owner/offline .*\(OSError: no network\)"):
        load_diffusers("owner/offline")


def test_sample_model_and_cli(dit_folder, ddpm_folder, tmp_path, capsys):
    path = dit_folder[0]
    s = sample_model(path, solver="ddim", nfe=3, num=3, guidance=2.0, class_label=2)
    assert s.images.shape == (3, 8, 8, 3) and s.latents.shape == (3, 4, 4, 2) and s.nfe == 6  # 2 calls per step
    np.testing.assert_array_equal(s.labels, [2, 2, 2])
    assert s.image_path is None and np.all(np.isfinite(s.images))
    with pytest.raises(ValueError, match=r"the class label must be in \[0, 4\), got 7"):
        sample_model(path, nfe=2, num=1, class_label=7)

    png = tmp_path / "out" / "dit.png"
    argv = ["sample", "--model", path, "--solver", "ddim", "--nfe", 3, "--num", 3, "--guidance", 2]
    argv += ["--grid-kind", "default"]
    code = cli.main([str(a) for a in argv + ["--class-label", 2, "--out", png]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "3 samples of" in out and "nfe 6, guidance 2" in out
    z = np.load(tmp_path / "out" / "dit.npz")
    np.testing.assert_allclose(z["images"], s.images, rtol=1e-5, atol=1e-5)  # the same samples
    with Image.open(png) as im:
        assert im.format == "PNG"

    for argv, msg in [
        (["--model", path, "--ema"], "--ema/--no-ema applies to --run; a --model folder has no run settings"),
        (["--model", "/nonexistent/m"], "--model /nonexistent/m: no such folder"),
        (["--model", path, "--grid-kind", "cosine"], "unknown --grid-kind 'cosine'; valid kinds: default, uniform"),
        (["--model", path, "--run", path], "give --run DIR or --model PATH, not both"),
        ([], "give --run DIR (a run of 'jdiff train'), --model PATH (a diffusers-format folder) or --student DIR"),
        (["--model", ddpm_folder[0], "--label", 1, "--out", tmp_path / "u.png"], "the model is unconditional"),
    ]:
        code = cli.main(["sample", *[str(a) for a in argv]])
        _, err = capsys.readouterr()
        assert code == 2 and msg in err and err.count("\n") == 1, (argv, err)


def test_register_architecture(tmp_path, monkeypatch):
    import jdiff.interop._folder as F

    monkeypatch.setattr(F, "ARCHITECTURES", dict(F.ARCHITECTURES))
    monkeypatch.setattr(F, "ROLES", dict(F.ROLES))
    cfg = {"_class_name": "MyNet", "sample_size": 4, "in_channels": 3}
    folder = _write(tmp_path / "my", cfg, _net_state(3, 3), "ddpm_linear")
    with pytest.raises(UnsupportedModelError, match="model class 'MyNet' is not supported"):
        load_diffusers(folder)
    jdiff.interop.register_architecture("MyNet", TinyNet)
    assert load_diffusers(folder).class_name == "MyNet"
    with pytest.raises(ValueError, match="role must be 'denoiser' or 'vae', got 'unet'"):
        jdiff.interop.register_architecture("MyNet", TinyNet, role="unet")
