"""jdiff reproduces diffusers' schedulers on the same grid, without torch in the suite.

``tests/data/vs_diffusers.npz`` is written by ``benchmarks/vs_diffusers.py`` (which runs
diffusers in its own virtualenv): the exact Gaussian-mixture testbed (8-D, 6 components,
``random_mixture(key(0), ...)``), 16 starting noises at diffusers' first timestep (999,
t = 1 of the DDPM linear 1000-step table), and diffusers' sigmas and final samples (to the
data) for DDIM, DPM-Solver++(2M), DPM-Solver++(3M) and UniPC-2 (bh2). Here jdiff runs the
same algorithm (``SAME`` in the script; the 3M is ``dpm++3m(variant=diffusers)``) on the
same grid (the same log-SNRs) from the same noises, with the testbed's exact denoiser.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import solvers as S
from jdiff.testbed import GaussianMixture

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "vs_diffusers.npz")
MAX_STEPS = 10  # one compiled sampling loop per solver serves every case (sample_padded)

# The bound for "same algorithm, same grid" in float32. Both sides compute in
# float32 (diffusers rounds its float64 posterior to float32), with differently arranged
# but equivalent formulas (phi-functions, multistep weights), so they differ by rounding
# only: per step a few tens of roundings of values up to max|x| (~3 here) scaled by
# coefficients of order 1, over at most 10 steps: 10 * 30 * 1.19e-7 (float32 eps) * 3 ~ 1.1e-4. The
# largest difference measured over 256 noises was 3.9e-5 (benchmarks/RESULTS.md).
TOL = 1e-4


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    return data


def _grids(sigma_lists):
    """diffusers' sigmas (``sigma_t / alpha_t``, 0 at the data) as jdiff times of the same
    log-SNR ``-log(sigma)`` under ``vp_discrete()`` (float64 inverse, then float32), all
    lists in one call (one shape: the eager float64 ops compile once)."""
    s = np.concatenate([np.asarray(v, np.float64) for v in sigma_lists])
    with jax.enable_x64(True):
        t = np.asarray(jdiff.vp_discrete().t_of_lambda(jnp.asarray(-np.log(np.where(s > 0, s, 1.0)))))
    t = np.where(s > 0, t, 0.0)
    out, start = [], 0
    for v in sigma_lists:
        g = t[start : start + len(v)].copy()
        g[0] = min(g[0], 1.0)  # timestep 999 is t = 1
        out.append(g)
        start += len(v)
    return out


@pytest.fixture(scope="module")
def jdiff_samples(fixture):
    """jdiff's final samples for every fixture case, one compiled loop per solver."""
    mix = GaussianMixture(fixture["weights"], fixture["means"], fixture["stds"])
    den = mix.denoiser(jdiff.vp_discrete())
    x_T = jnp.asarray(fixture["x_T"])
    cases = json.loads(str(fixture["cases"]))
    grids = _grids([fixture[f"sigmas|{key}"] for key, _ in cases])
    out = {}
    for (key, name), grid in zip(cases, grids):
        out[key] = np.asarray(
            jdiff.sample_padded(S.get(name), den, x_T, jnp.asarray(grid, jnp.float32), max_steps=MAX_STEPS)
        )
    return out


def test_same_algorithm_same_grid_matches_diffusers(fixture, jdiff_samples):
    spec = json.loads(str(fixture["mixture"]))
    assert fixture["x_T"].shape == (16, spec["dim"]) and fixture["means"].shape == (spec["components"], spec["dim"])
    assert str(fixture["diffusers_version"]) and str(fixture["torch_version"])
    cases = json.loads(str(fixture["cases"]))
    assert {key.split("|")[0] for key, _ in cases} == {"ddim", "dpm++2m", "dpm++3m", "unipc2"}
    worst = {}
    for key, name in cases:
        ref = fixture[f"x|{key}"]
        x = jdiff_samples[key]
        assert np.all(np.isfinite(x)), key
        worst[f"{key} ({name})"] = float(np.max(np.abs(x - ref)))
    assert max(worst.values()) <= TOL, worst


def test_the_tolerance_separates_algorithms(fixture, jdiff_samples):
    """The check can fail: at NFE 5 on diffusers' default spacing (one grid for the three
    multistep solvers; DDIM's timesteps give nearly the same one) every other algorithm's
    samples are far outside the tolerance, so matching to 1e-4 pins down the algorithm."""
    keys = ["ddim|default|5", "dpm++2m|default|5", "dpm++3m|default|5", "unipc2|default|5"]
    assert len({tuple(fixture[f"sigmas|{k}"]) for k in keys[1:]}) == 1
    for a in keys:
        for b in keys:
            if a != b:
                assert np.max(np.abs(jdiff_samples[a] - fixture[f"x|{b}"])) > 10 * TOL, (a, b)
