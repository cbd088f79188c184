"""End to end on diffusers pipeline folders built from the committed fixtures: the folder
loads through :func:`jdiff.interop.load_diffusers` (architecture, scheduler, weights),
its denoiser reproduces diffusers' recorded network outputs at the scheduler's own
timesteps, and jdiff's solvers, gradient strategies and the CLI run on it unchanged.

The network tolerance is the one ``tests/test_interop_unet.py`` derives (float32
rounding over about 25 layers in series: ``2e-5`` of each sample's largest output)."""

from __future__ import annotations

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
