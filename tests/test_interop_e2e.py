"""End to end on diffusers pipeline folders built from the committed fixtures: the folder
loads through :func:`jdiff.interop.load_diffusers` (architecture, scheduler, weights),
its denoiser reproduces diffusers' recorded network outputs at the scheduler's own
timesteps, and jdiff's solvers, gradient strategies and the CLI run on it unchanged.

The network tolerance is the one ``tests/test_interop_unet.py`` derives (float32
rounding over about 25 layers in series: ``2e-5`` of each sample's largest output)."""

from __future__ import annotations

import csv
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import interop, solvers

FIX = pathlib.Path(__file__).parent / "fixtures" / "diffusers"
TOL = 2e-5
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    """google/ddpm-cifar10-32's layout: model_index.json, unet/, scheduler/."""
    root = tmp_path_factory.mktemp("ddpm-pipeline")
    shutil.copytree(FIX / "unet" / "ddpm", root / "unet")
    (root / "scheduler").mkdir()
    shutil.copy(FIX / "schedulers" / "ddpm_linear" / "scheduler_config.json", root / "scheduler")
    index = {
        "_class_name": "DDPMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root, interop.load_diffusers(root)


def test_pipeline_folder_reproduces_diffusers_outputs_at_its_timesteps(ddpm):
    _, m = ddpm
    ref = np.load(FIX / "unet" / "ddpm.npz")
    N = m.process.num_train_steps
    assert (m.denoiser.prediction, m.denoiser.time_input, N) == ("eps", "timestep", 1000)
    x = jnp.asarray(ref["x"].transpose(0, 2, 3, 1))
    t = (jnp.asarray(ref["timesteps"]) + 1.0) / N  # VPDiscrete: step n sits at t = (n + 1) / N
    got = np.asarray(jax.jit(m.denoiser.raw)(x, t)).transpose(0, 3, 1, 2)
    want = ref["out"]
    scale = np.abs(want).reshape(len(want), -1).max(axis=1)[:, None, None, None]
    np.testing.assert_array_less(np.abs(got - want), np.broadcast_to(TOL * scale, want.shape))
    # the process is diffusers' table: alpha(t_n)^2 = alphas_cumprod[n]
    betas = np.linspace(1e-4, 0.02, 1000)
    ac = np.cumprod(1.0 - betas)
    n = np.array([0, 1, 499, 999])
    a2 = np.asarray(m.process.alpha(jnp.asarray((n + 1) / N, jnp.float32))) ** 2
    np.testing.assert_allclose(a2, ac[n], rtol=64 * EPS32)


def test_solvers_and_gradient_strategies_run_on_a_loaded_model(ddpm):
    """DPM-Solver++(2M) at 10 NFE on the scheduler's grid; the gradient of a loss of the
    samples with respect to the noise is the same through Backprop and Remat (the same
    arithmetic, recomputed) and finite."""
    _, m = ddpm
    s = solvers.get("dpm++2m")
    grid = m.grid(10, s)
    assert grid.shape == (11,) and float(grid[-1]) == 0.0
    x_T = jax.random.normal(jax.random.key(0), (2, *m.shape))
    den = m.sampling_denoiser()

    def loss(x, gradient):
        return jnp.sum(jdiff.sample(s, den, x, grid, gradient=gradient) ** 2)

    v, g = jax.jit(jax.value_and_grad(lambda x: loss(x, jdiff.Backprop())))(x_T)
    v2, g2 = jax.jit(jax.value_and_grad(lambda x: loss(x, jdiff.Remat())))(x_T)
    assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(float(v2), float(v), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g), rtol=1e-4, atol=1e-4 * float(jnp.abs(g).max()))


# ------------------------------------------------------------- DiT with its VAE (latent)
@pytest.fixture(scope="module")
def dit():
    """facebook/DiT-XL-2-256's layout in miniature: model_index.json, transformer/ (the
    legacy Transformer2DModel config), vae/, scheduler/ (DDIM)."""
    return interop.load_diffusers(FIX / "dit")


def test_dit_pipeline_folder_loads_with_its_vae_and_reproduces_diffusers(dit):
    m = dit
    assert m.shape == (8, 8, 4) and (m.num_classes, m.null_class) == (10, 10) and m.vae is not None
    ref = np.load(FIX / "dit.npz")
    x = jnp.asarray(ref["x"].transpose(0, 2, 3, 1))
    t = (jnp.asarray(ref["t"]) + 1.0) / m.process.num_train_steps
    got = np.asarray(jax.jit(m.denoiser.raw)(x, t, jnp.asarray(ref["y"], jnp.int32))).transpose(0, 3, 1, 2)
    want = ref["out"][:, :4]  # the learned-variance channels are split off
    # tests/test_interop_dit.py's bound: EPS32 max|ref| (200 + t) per sample
    bound = EPS32 * np.abs(want).reshape(3, -1).max(1) * (200 + ref["t"])
    np.testing.assert_array_less(np.abs(got - want), np.broadcast_to(bound[:, None, None, None], want.shape))
    # decoding: the VAE at the scaling factor (16x16 images from 8x8x4 latents)
    z = jax.random.normal(jax.random.key(1), (2, *m.shape))
    img = m.decode(z)
    assert img.shape == (2, 16, 16, 3)
    # eager against m.decode's compiled program: reassociation only, bounded as
    # tests/test_interop_vae.py bounds the decoder (18 layers x sqrt(144-term sums) x EPS32)
    want = np.asarray(m.vae.from_latent(z))
    np.testing.assert_allclose(np.asarray(img), want, rtol=0, atol=18 * 12 * EPS32 * np.abs(want).max())


def test_jdiff_sample_model_writes_an_image_from_the_dit_with_its_vae(dit, tmp_path, capsys):
    """``jdiff sample --model`` on the DiT folder: guided DPM-Solver++(2M), decoded by the
    VAE; the saved latents decode to the saved images."""
    from PIL import Image

    from jdiff import cli

    png = tmp_path / "dit.png"
    argv = ["sample", "--model", FIX / "dit", "--solver", "dpm++2m", "--nfe", "4", "--num", "4"]
    code = cli.main([str(a) for a in argv + ["--guidance", "4", "--class-label", "3", "--out", png]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert png.is_file() and Image.open(png).size[0] >= 32
    rec = np.load(tmp_path / "dit.npz")
    assert rec["images"].shape == (4, 16, 16, 3) and rec["latents"].shape == (4, 8, 8, 4)
    assert list(rec["labels"]) == [3] * 4 and float(rec["guidance"]) == 4.0 and int(rec["nfe"]) == 8  # CFG: 2 calls
    assert np.all(np.isfinite(rec["images"]))
    again = np.asarray(jax.jit(dit.decode)(jnp.asarray(rec["latents"])))
    np.testing.assert_allclose(rec["images"], again, atol=18 * 12 * EPS32 * np.abs(again).max())


class _MeanColour:
    """A tiny feature network for the bench test: per-channel means and standard
    deviations of an image (6 features), so FID's Frechet distance runs in 6 dimensions."""

    name = "tiny"
    dim = 6

    def __call__(self, images):
        x = np.asarray(images, np.float64) / (255.0 if np.asarray(images).dtype == np.uint8 else 1.0)
        return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)


def test_jdiff_bench_model_runs_on_the_dit_with_a_tiny_reference(tmp_path, monkeypatch, capsys):
    from jdiff import bench_model as BM
    from jdiff import cli
    from jdiff.cli import bench as bench_cli
    from jdiff.metrics import save_stats

    monkeypatch.setattr(BM, "inception_extractor", lambda w: _MeanColour())
    monkeypatch.setattr(bench_cli, "INCEPTION_DIM", _MeanColour.dim)
    refimg = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    f = _MeanColour()(refimg)
    ref = tmp_path / "ref.npz"
    save_stats(ref, f.mean(0), np.cov(f, rowvar=False))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    argv = ["bench", "--model", FIX / "dit", "--reference", ref, "--inception", weights, "--no-progress"]
    argv += ["--solvers", "ddim,dpm++2m", "--nfe", "3", "--samples", "10", "--out", tmp_path / "o"]
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    with open(tmp_path / "o" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["solver"], int(r["nfe_used"])) for r in rows] == [("ddim", 3), ("dpm++2m", 3)]
    # the samples are far from uniform noise images: a positive, finite distance
    assert all(0 < float(r["fd_tiny"]) < np.inf for r in rows), rows
    assert out.splitlines()[-1].startswith("model sweep: 2 cells in ")


def test_exact_inversion_of_encoded_images_through_the_loaded_dit(dit):
    """Latent editing's first step on a loaded model: images -> VAE latents -> EDICT
    inversion with the guided DiT -> regeneration gives the latents back. EDICT is exact
    in exact arithmetic (tests/test_inversion.py: 1e-11 in float64); here the network
    computes in float32 and EDICT's mixing (1/p per step) amplifies its rounding through
    a random-weight network: measured 2e-3 of the latents' scale, bounded at 1e-2. A
    wrong wiring (process, time input, labels, scaling) leaves an O(1) error."""
    m = dit
    images = jnp.tanh(jax.random.normal(jax.random.key(2), (2, 16, 16, 3)))
    z = m.encode(images)
    assert z.shape == (2, *m.shape)
    labels = jnp.array([1, 7], jnp.int32)
    den = m.sampling_denoiser(2.0)
    inv = jdiff.inversion.edict_invert(den, z, nfe=8, cond=labels)
    back = jdiff.inversion.regenerate(den, inv, cond=labels)
    scale = float(jnp.abs(z).max())
    np.testing.assert_allclose(np.asarray(back), np.asarray(z), atol=1e-2 * scale)
    assert float(jnp.abs(inv.x_T).max()) > 3 * scale  # it did reach the noise end
