"""A diffusers scheduler config as a jdiff process and grid, against diffusers' own tables.

``tests/fixtures/diffusers/schedulers/`` is written by ``make_schedulers.py`` in that
folder (diffusers in its own virtualenv): for ten configs of DDPM, DDIM, DPM-Solver++,
Euler and PNDM, the config file diffusers saves, its ``alphas_cumprod`` and the
timesteps of ``set_timesteps`` for 5, 10 and 25 steps. No torch here.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff.interop import UnsupportedModelError, scheduler_from_config

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "schedulers")
STEPS = (5, 10, 25)
U = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module")
def tables():
    with np.load(os.path.join(HERE, "tables.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def cases(tables):
    """case -> (the scheduler read from diffusers' saved file, from the sparse config)."""
    out = {}
    for case, (name, cfg) in json.loads(str(tables["cases"])).items():
        with open(os.path.join(HERE, case, "scheduler_config.json")) as f:
            full = json.load(f)
        out[case] = (scheduler_from_config(full), scheduler_from_config({"_class_name": name, **cfg}))
    return out


def _float32_bound(s):
    """Per entry, the relative difference between a table computed in float64 and
    diffusers' float32 one: each beta rounded to float32 (relative error ``u beta /
    alpha`` on ``alpha = 1 - beta``) and one rounding per float32 product of the cumprod,
    a factor 2 of slack; jdiff's float32 ``exp(2 log alpha)`` (``2 |log a| u``); with
    zero terminal SNR, diffusers' float32 shift ``sqrt(a) - sqrt(a_last)`` (absolute
    error ``u sqrt(a_0)``, relative ``u sqrt(a_0 / a)`` on ``sqrt(a)``)."""
    ac = np.exp(2.0 * np.asarray(s.process.log_alphas[1:], np.float64))
    alpha = np.concatenate([ac[:1], ac[1:] / np.where(ac[:-1] > 0, ac[:-1], 1.0)])
    with np.errstate(divide="ignore"):
        bound = U * (2.0 * np.cumsum(1.0 + (1.0 - alpha) / np.maximum(alpha, 1e-300)) + 2.0 * np.abs(np.log(ac)) + 8.0)
        if s.process.zero_terminal_snr:
            bound = bound + 4.0 * U * np.sqrt(ac[0] / ac)
    return bound


def _alphas_cumprod(s):
    N = s.num_train_timesteps
    t = jnp.asarray((np.arange(N) + 1.0) / N, jnp.float32)
    return np.asarray(s.process.alpha(t), np.float64) ** 2


def test_alphas_cumprod_equal_diffusers_to_float32_rounding(tables, cases):
    assert len(cases) == 11 and str(tables["diffusers_version"])
    for case, (s, sparse) in cases.items():
        ref = tables[f"{case}|alphas_cumprod"].astype(np.float64)
        assert s.num_train_timesteps == ref.size == sparse.num_train_timesteps, case
        mine = _alphas_cumprod(s)
        np.testing.assert_array_equal(s.process.log_alphas, sparse.process.log_alphas, err_msg=case)
        pos = ref > 0
        bound = _float32_bound(s)
        assert np.all(np.abs(mine[pos] - ref[pos]) <= bound[pos] * ref[pos]), case
        assert np.all(mine[~pos] == 0.0), case  # zero terminal SNR: exactly 0, as in diffusers' DDIM
        # the bound is tight enough to see a table shifted by one step
        assert np.any(np.abs(mine[1:] - ref[:-1]) > bound[1:] * ref[:-1]), case


def test_zero_terminal_snr_is_exact(cases):
    s = cases["ddim_trailing_zero_snr"][0]
    assert s.process.zero_terminal_snr and s.prediction == "v"
    assert float(s.process.alpha(jnp.float32(1.0))) == 0.0


def test_timesteps_and_final_point_equal_diffusers(tables, cases):
    for case, (s, sparse) in cases.items():
        N = s.num_train_timesteps
        for n in STEPS:
            ref = tables[f"{case}|timesteps|{n}"]
            distinct = np.unique(ref)[::-1]  # PNDM repeats one timestep (its warm-up)
            assert len(distinct) == len(ref) or s.class_name == "PNDMScheduler", case
            np.testing.assert_array_equal(s.timesteps(n), distinct, err_msg=f"{case} steps={n}")
            np.testing.assert_array_equal(sparse.timesteps(n), distinct, err_msg=f"{case} steps={n}")
            grid = s.grid(n)
            s.process.check_times(np.asarray(grid), allow_data=True)
            assert np.all(np.diff(np.asarray(grid)) < 0)
            g = np.asarray(grid, np.float64)
            # float32 times t = (timestep + 1) / N: the network's N t - 1 to N u
            np.testing.assert_allclose(N * g[: len(distinct)] - 1.0, distinct, rtol=0, atol=N * U * 2)
            final = float(s.process.alpha(jnp.float32(g[-1]))) ** 2
            ref_final = float(tables[f"{case}|final_alpha_cumprod|{n}"])
            assert abs(final - ref_final) <= 1e-6 * ref_final, (case, n, final, ref_final)
            # the last point is added unless the last timestep is already where the scheduler ends
            at_end = ref_final == float(tables[f"{case}|alphas_cumprod"][int(distinct[-1])])
            assert len(g) == len(distinct) + (0 if at_end else 1), (case, n)


# Both sides in float32, equivalent formulas arranged differently: per step some tens of
# roundings of values of the samples' scale times coefficients of order 1, over at most 10
# steps (the bound of tests/test_vs_diffusers.py, 10 * 30 * u32 * scale, u32 = 1.19e-7);
# the network's time N t - 1 is off by at most N u = 6e-5 (the model's slope in it: 1e-3).
def _loop_tol(ref):
    return 10 * 30 * 1.19e-7 * max(1.0, float(np.max(np.abs(ref))))


def test_sampling_on_the_default_grid_equals_the_schedulers_loop(tables, cases):
    """The scheduler's own loop (DDIM with clipping, zero terminal SNR and v-prediction;
    DPM-Solver++(2M) with lambda clipping and dynamic thresholding; Euler) with an
    analytic model equals jdiff's solver of the same algorithm on the default grid, the
    model taking jdiff's timestep input: the grid, the end point, the time input, the
    parameterization and the thresholding together."""
    x_T = jnp.asarray(tables["loop_x_T"])
    keys = sorted(k for k in tables if "|loop|" in k)
    assert len(keys) == 10
    for key in keys:
        case, _, n = key.split("|")
        s = cases[case][0]
        den = jdiff.denoiser(
            lambda x, t, c: jnp.tanh(x / 2 + t[:, None, None, None] / 1000),
            s.process,
            s.prediction,
            time_input="timestep",
        )
        if s.thresholding is not None:
            den = s.thresholding(den)
        # one compiled loop per case for both step counts
        x = jdiff.sample_padded(jdiff.solvers.get(s.solver), den, x_T, s.grid(int(n)), max_steps=10)
        err = float(np.max(np.abs(np.asarray(x) - tables[key])))
        assert err <= _loop_tol(tables[key]), (key, err)


def test_settings_read(cases):
    s = {k: v[0] for k, v in cases.items()}
    assert s["ddpm_linear"].solver == "ddpm" and s["ddpm_linear"].final == "data"
    assert s["ddim_scaled_leading"].final == "t_min" and s["ddim_scaled_leading"].steps_offset == 1
    assert s["dpm_cosine_linspace"].solver == "dpm++2m" and s["dpm_cosine_linspace"].prediction == "x0"
    assert s["dpm_leading_sigma_min"].solver == "dpm++3m" and s["dpm_leading_sigma_min"].final == "t_min"
    assert s["euler_trailing"].solver == "euler-rho" and s["pndm_leading"].final == "t_min"
    for name in s.values():
        jdiff.solvers.get(name.solver)


def test_thresholding_mapping(cases):
    th = {k: v[0].thresholding for k, v in cases.items()}
    assert th["ddpm_linear"] == jdiff.interop.Thresholding("static", clip_range=1.0)  # DDPM clips by default
    assert th["ddim_trailing_zero_snr"] == jdiff.interop.Thresholding("static", clip_range=1.5)
    assert th["dpm_cosine_linspace"] == jdiff.interop.Thresholding("dynamic", ratio=0.99, max_value=1.5)
    assert th["ddim_scaled_leading"] is None and th["ddpm_trained_linspace"] is None  # clip_sample=False
    assert th["euler_trailing"] is None and th["pndm_leading"] is None  # these classes never clip

    # the wrappers do what diffusers' _threshold_sample and clamp do to x0
    proc = cases["ddpm_linear"][0].process
    x0 = np.linspace(-3.0, 3.0, 2 * 50, dtype=np.float32).reshape(2, 50)
    x0[1] *= 0.4
    den = jdiff.denoiser(lambda x, t, c: jnp.asarray(x0), proc, "x0", time_input="timestep")
    x, t = jnp.zeros((2, 50)), jnp.float32(0.5)
    static = np.asarray(th["ddim_trailing_zero_snr"](den)(x, t).x0)
    np.testing.assert_array_equal(static, np.clip(x0, -1.5, 1.5))
    dyn = np.asarray(th["dpm_cosine_linspace"](den)(x, t).x0)
    s = np.clip(np.quantile(np.abs(x0), 0.99, axis=1), 1.0, 1.5)[:, None]
    np.testing.assert_allclose(dyn, np.clip(x0, -s, s) / s, rtol=1e-6)
    assert s[0, 0] == 1.5 and 1.0 < s[1, 0] < 1.5


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"_class_name": "LMSDiscreteScheduler"},
            "scheduler_config.json: scheduler class 'LMSDiscreteScheduler' is not supported; supported: "
            "DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler",
        ),
        (
            {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True},
            "scheduler_config.json (EulerDiscreteScheduler): use_karras_sigmas=True is not supported; "
            "supported: use_karras_sigmas=False",
        ),
        (
            {"_class_name": "DDIMScheduler", "prediction_type": "flow_prediction"},
            "scheduler_config.json (DDIMScheduler): prediction_type='flow_prediction' is not supported; "
            "supported: epsilon, sample, v_prediction",
        ),
        (
            {"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"},
            "scheduler_config.json (DDIMScheduler): beta_schedule='sigmoid' is not supported; supported: "
            "linear, scaled_linear, squaredcos_cap_v2 or trained_betas",
        ),
        (
            {"_class_name": "DDPMScheduler", "timestep_spacing": "karras"},
            "scheduler_config.json (DDPMScheduler): timestep_spacing='karras' is not supported; supported: "
            "leading, trailing, linspace",
        ),
    ],
)
def test_unsupported_scheduler_one_line(config, message):
    with pytest.raises(UnsupportedModelError) as e:
        scheduler_from_config(config)
    assert str(e.value) == message


def test_bad_values():
    with pytest.raises(ValueError, match="trained_betas has 3 entries, num_train_timesteps is 1000"):
        scheduler_from_config({"_class_name": "DDPMScheduler", "trained_betas": [0.1, 0.2, 0.3]})
    s = scheduler_from_config({"_class_name": "DDIMScheduler", "num_train_timesteps": 10})
    with pytest.raises(ValueError, match=r"the number of steps must be an integer in \[1, 10\]"):
        s.grid(11)
    s = scheduler_from_config({"_class_name": "DDIMScheduler", "steps_offset": 5, "num_train_timesteps": 10})
    with pytest.raises(ValueError, match="steps_offset=5 puts timestep 10 outside the 10 training steps"):
        s.grid(2)
